//! S7 scale: what many pipelines cost. For each set (1, 5 and 20 pipelines of 3 steps, and the
//! largest again with `priorities = ["normal"]`) in a throw-away namespace of its own: the time
//! `topology apply` takes, the time a worker process serving every pipeline takes from its
//! start to a consumer on every step queue, its consumers, its idle RSS and CPU, and the idle
//! broker's CPU for the namespace (the broker's CPU with the namespace declared and the worker
//! idle, minus the same just before the namespace existed).

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use warren_broker::depth::Probe;
use warren_broker::{Broker, Topology};
use warren_common::Config;

use super::report::{Row, Target};
use super::warren_side::{memory_mib, with_log_tail};
use super::Bench;

/// The `/proc/<pid>/stat` clock: USER_HZ, which Linux fixes at 100 for user space.
const TICKS_PER_SECOND: f64 = 100.0;

/// One set of S7: how many pipelines, and whether they declare only `normal`.
#[derive(Debug, Clone, Copy)]
struct Set {
    pipelines: usize,
    normal_only: bool,
}

impl Set {
    fn label(self) -> String {
        let s = if self.pipelines == 1 { "" } else { "s" };
        match self.normal_only {
            true => format!("{} pipeline{s}, normal only", self.pipelines),
            false => format!("{} pipeline{s}", self.pipelines),
        }
    }
}

pub(super) async fn s7(b: &Bench, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let mut sets: Vec<Set> = b
        .args
        .scale_pipelines
        .iter()
        .map(|&pipelines| Set {
            pipelines,
            normal_only: false,
        })
        .collect();
    if let Some(&largest) = b.args.scale_pipelines.iter().max() {
        sets.push(Set {
            pipelines: largest,
            normal_only: true,
        });
    }
    for set in sets {
        one_set(b, rows, set).await.with_context(|| set.label())?;
    }
    Ok(())
}

/// `n` pipelines `p0`..`p<n-1>` of 3 no-op steps, as TOML (pipelines only).
fn pipelines_toml(set: Set, shards: Option<u16>) -> String {
    let mut text = String::new();
    for i in 0..set.pipelines {
        text.push_str(&format!("[[pipelines]]\nname = \"p{i}\"\n"));
        if let Some(shards) = shards {
            text.push_str(&format!("shards = {shards}\n"));
        }
        if set.normal_only {
            text.push_str("priorities = [\"normal\"]\n");
        }
        for step in ["a", "b", "c"] {
            text.push_str(&format!(
                "[[pipelines.steps]]\nname = \"{step}\"\nhandler = \"noop\"\n"
            ));
        }
    }
    text
}

/// The pipelines of the TOML file `path`, on the base config's broker, in namespace `ns`: the
/// config of S7's worker process.
pub(super) fn load_config(base: &Config, ns: &str, path: &Path) -> anyhow::Result<Config> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let mut config = Config::parse(&text, "scale", Path::new("."), &HashMap::new())?;
    config.broker = base.broker.clone();
    config.broker.namespace = ns.to_string();
    Ok(config)
}

async fn one_set(b: &Bench, rows: &mut Vec<Row>, set: Set) -> anyhow::Result<()> {
    let suffix = if set.normal_only { "n" } else { "" };
    let ns = format!("{}-s7-{}{suffix}", b.config.broker.namespace, set.pipelines);
    let file = std::env::temp_dir().join(format!("{ns}.toml"));
    std::fs::write(&file, pipelines_toml(set, b.args.scale_shards))?;
    let config = load_config(&b.config, &ns, &file)?;
    let plan = Topology::plan(&config);
    let broker_pid = broker_pid(config.broker.url());
    let window = b.args.scale_window;

    // The broker with no namespace of this set, just before.
    // The broker's figures are context, not the subject: one that cannot be read is left out.
    let broker_before = match broker_pid {
        Some(pid) => cpu_share(pid, window).await.ok(),
        None => None,
    };
    // From here on the bench deletes the namespace whatever happens.
    b.more_plans.lock().expect("lock").push(plan.clone());
    let log = std::env::temp_dir().join(format!("{ns}-worker.log"));
    let measured = async {
        let started = Instant::now();
        plan.declare(&b.admin).await?;
        let apply = started.elapsed();

        let started = Instant::now();
        let pid = b.spawn_worker_process(&log, Some((&ns, &file)))?;
        let consumers = all_consumed(&b.admin, &plan, b.args.patience).await?;
        let start = started.elapsed();
        // Let start-up work settle before calling it idle.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (rss, _) = memory_mib(pid)?;
        let (worker, broker) = match broker_pid {
            Some(broker_pid) => {
                let (worker, broker) =
                    tokio::join!(cpu_share(pid, window), cpu_share(broker_pid, window));
                (worker?, broker.ok())
            }
            None => (cpu_share(pid, window).await?, None),
        };
        Ok::<_, anyhow::Error>((apply, start, consumers, rss, worker, broker))
    }
    .await;
    b.stop_worker_process().await;
    let deleted = plan.delete(&b.admin).await;
    if deleted.is_ok() {
        b.more_plans.lock().expect("lock").retain(|p| p != &plan);
    }
    let (apply, start, consumers, rss, worker, broker) = match measured {
        Ok(m) => m,
        Err(e) => return Err(with_log_tail(e, &log)),
    };
    deleted.context("deleting the S7 namespace")?;
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_file(&file);

    let label = set.label();
    let queues = plan.queues.len();
    rows.push(Row::new(
        "S7",
        format!("{label}: topology apply, {queues} queues"),
        "s",
        apply.as_secs_f64(),
        None,
        Target::Below(10.0),
    ));
    rows.push(Row::new(
        "S7",
        format!("{label}: worker start to every consumer"),
        "s",
        start.as_secs_f64(),
        None,
        Target::Below(5.0),
    ));
    rows.push(Row::new(
        "S7",
        format!("{label}: consumers of the worker"),
        "count",
        consumers as f64,
        None,
        Target::Info,
    ));
    rows.push(Row::new(
        "S7",
        format!("{label}: worker RSS idle"),
        "MiB",
        rss,
        None,
        Target::Info,
    ));
    rows.push(Row::new(
        "S7",
        format!("{label}: worker CPU idle"),
        "% core",
        worker,
        None,
        Target::Below(1.0),
    ));
    let for_namespace = match (broker, broker_before) {
        (Some(with), Some(without)) => with - without,
        _ => f64::NAN,
    };
    // The broker's CPU without the namespace goes in the baseline column, for context; their
    // ratio would mean nothing.
    let mut broker_row = Row::new(
        "S7",
        format!("{label}: broker CPU idle, for the namespace"),
        "% core",
        for_namespace,
        broker_before,
        Target::Info,
    );
    broker_row.ratio = None;
    rows.push(broker_row);
    Ok(())
}

/// Waits until every step queue of `plan` has a consumer, in plan order; returns the sum of
/// their consumers when the last one had its first.
async fn all_consumed(broker: &Broker, plan: &Topology, patience: Duration) -> anyhow::Result<u32> {
    let mut probe = Probe::new(broker);
    let walked = async {
        let deadline = Instant::now() + patience;
        let mut consumers = 0;
        for queue in plan.step_queues() {
            loop {
                let Some(counts) = probe.read(&queue.name).await? else {
                    bail!("{} does not exist", queue.name);
                };
                if counts.consumers > 0 {
                    consumers += counts.consumers;
                    break;
                }
                if Instant::now() > deadline {
                    bail!("no worker consumed {} within {patience:?}", queue.name);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        Ok(consumers)
    }
    .await;
    probe.close().await;
    walked
}

/// The CPU process `pid` used over the next `window`, in % of one core.
async fn cpu_share(pid: u32, window: Duration) -> anyhow::Result<f64> {
    let before = cpu_ticks(pid)?;
    let started = Instant::now();
    tokio::time::sleep(window).await;
    let used = cpu_ticks(pid)?.saturating_sub(before) as f64 / TICKS_PER_SECOND;
    Ok(100.0 * used / started.elapsed().as_secs_f64())
}

/// utime + stime of `pid` (all its threads), in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    parse_cpu_ticks(&stat).with_context(|| format!("no utime/stime in /proc/{pid}/stat"))
}

/// Fields 14 and 15 of a `/proc/<pid>/stat` line. The command name (field 2) is in
/// parentheses and may hold spaces, so fields are counted from after its `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The RabbitMQ node's process (`beam.smp`), when the broker's URL names this machine and the
/// process is visible here.
fn broker_pid(url: &str) -> Option<u32> {
    let host = url.split("://").nth(1)?;
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    let host = host.split(['/', '?']).next()?;
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next()?,
        None => host.split(':').next()?,
    };
    if !matches!(host, "127.0.0.1" | "localhost" | "::1") {
        return None;
    }
    // `rabbitmqctl` runs a short-lived beam.smp of its own (another test or a script may be
    // calling it right now), so the broker is the beam.smp that started first.
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
            if comm.trim() != "beam.smp" {
                return None;
            }
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            Some((parse_start_time(&stat)?, pid))
        })
        .min()
        .map(|(_, pid)| pid)
}

/// Field 22 of a `/proc/<pid>/stat` line: when the process started, in ticks since boot.
fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_read_past_a_command_with_spaces() {
        let stat = "24014 (beam smp) S 1 24014 24014 0 -1 4194560 60 0 0 0 1234 567 0 0 20 0";
        assert_eq!(parse_cpu_ticks(stat), Some(1234 + 567));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn start_time_is_field_22() {
        let stat = "24014 (beam smp) S 1 24014 24014 0 -1 4194560 60 0 0 0 1234 567 0 0 20 0 31 0 98765 1000";
        assert_eq!(parse_start_time(stat), Some(98765));
        assert_eq!(parse_start_time("garbage"), None);
    }

    #[test]
    fn only_a_local_broker_is_measured() {
        assert_eq!(
            broker_pid("amqp://guest:guest@rabbit.example:5672/%2f"),
            None
        );
        assert_eq!(broker_pid("amqps://u:p@10.0.0.5/vh"), None);
    }

    #[test]
    fn the_generated_pipelines_parse_with_their_priorities() {
        let set = Set {
            pipelines: 3,
            normal_only: true,
        };
        let config = Config::parse(
            &pipelines_toml(set, Some(2)),
            "t",
            Path::new("."),
            &HashMap::new(),
        )
        .unwrap();
        assert_eq!(config.pipelines.len(), 3);
        assert!(config.pipelines.iter().all(|p| p.shards == 2
            && p.steps.len() == 3
            && p.priorities == [warren_common::Priority::Normal]));
        // 3 pipelines x 3 steps x 1 priority x (2 shards + 2 hot lanes).
        assert_eq!(Topology::plan(&config).step_queues().count(), 36);
    }
}
