//! `warren topology apply|delete|plan`. `plan` and `apply` also say how many queues the
//! namespace needs and, when the broker's management API answers, whether its open-files limit
//! holds them ([`warren_broker::capacity`]): a namespace too big for it makes every later
//! connection hang, so `apply` warns first.

use std::collections::HashSet;

use crate::output::outln;
use anyhow::bail;
use clap::{Args, Subcommand};
use lapin::uri::AMQPUri;
use serde_json::{json, Value};
use warren_broker::capacity::{self, FileCheck, QueueCounts};
use warren_broker::{Broker, Management, Names, Topology};
use warren_common::Config;

/// Where a local broker's management API answers by default (`deploy/local/` enables it).
const LOCAL_MANAGEMENT_URL: &str = "http://127.0.0.1:15672";

#[derive(Debug, Args)]
pub(crate) struct TopologyArgs {
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, Subcommand)]
enum Action {
    /// Declare every exchange and queue the config needs (idempotent).
    Apply,
    /// Delete every exchange and queue of the namespace, with their messages.
    Delete {
        /// Confirm the deletion.
        #[arg(long)]
        yes: bool,
    },
    /// Print the exchanges and queues the config implies, without touching the broker.
    Plan,
}

pub(crate) async fn run(args: TopologyArgs, config: &Config, json: bool) -> anyhow::Result<()> {
    let plan = Topology::plan(config);
    let ns = &config.broker.namespace;
    let counts = QueueCounts::of(&plan, &Names::new(ns));
    match args.action {
        Action::Plan => {
            let files = open_files(config, &plan).await;
            if json {
                let queues: Vec<_> = plan.queues.iter().map(|q| &q.name).collect();
                let exchanges: Vec<_> = plan.exchanges.iter().map(|e| &e.name).collect();
                outln!(
                    "{}",
                    json!({
                        "exchanges": exchanges,
                        "queues": queues,
                        "counts": counts_json(&counts),
                        "open_files": files.as_ref().map(files_json),
                    })
                );
            } else {
                plan.exchanges
                    .iter()
                    .for_each(|e| outln!("exchange {} ({})", e.name, e.kind));
                plan.queues
                    .iter()
                    .for_each(|q| outln!("queue    {}", q.name));
                summary(ns, &counts, files.as_ref()).for_each(|l| outln!("{l}"));
            }
            warn_if_exhausted(files.as_ref());
        }
        Action::Apply => {
            let files = open_files(config, &plan).await;
            if !json {
                summary(ns, &counts, files.as_ref()).for_each(|l| outln!("{l}"));
            }
            warn_if_exhausted(files.as_ref());
            let broker = Broker::connect(&config.broker)
                .await
                .map_err(|e| with_files_hint(e.into()))?;
            let declared = plan.declare(&broker).await;
            broker.close().await;
            match declared {
                Err(e @ warren_broker::TopologyError::Conflict { .. }) => return Err(e.into()),
                Err(e) => return Err(with_files_hint(e.into())),
                Ok(()) => {}
            }
            if json {
                outln!(
                    "{}",
                    json!({
                        "namespace": ns,
                        "applied": {"exchanges": plan.exchanges.len(), "queues": plan.queues.len()},
                        "counts": counts_json(&counts),
                        "open_files": files.as_ref().map(files_json),
                    })
                );
            } else {
                report(false, "applied", ns, &plan);
            }
        }
        Action::Delete { yes } => {
            if !yes {
                bail!("this deletes every queue of namespace {ns:?} with its messages; add --yes");
            }
            let broker = Broker::connect(&config.broker).await?;
            plan.delete(&broker).await?;
            broker.close().await;
            report(json, "deleted", ns, &plan);
        }
    }
    Ok(())
}

fn report(json: bool, what: &str, ns: &str, plan: &Topology) {
    let (exchanges, queues) = (plan.exchanges.len(), plan.queues.len());
    if json {
        outln!(
            "{}",
            json!({"namespace": ns, what: {"exchanges": exchanges, "queues": queues}})
        );
    } else {
        outln!("{what} namespace {ns}: {exchanges} exchanges, {queues} queues");
    }
}

/// The management API to ask for the broker's open-files figures: the configured one, else the
/// local default when the broker is the local default one, 127.0.0.1:5672 (and then only if it
/// answers: no error when not).
/// The flag says whether it was configured, so that its failures are worth a word.
fn management_for(config: &Config) -> Option<(Management, bool)> {
    match Management::from_config(&config.broker) {
        Ok(Some(management)) => return Some((management, true)),
        Ok(None) => {}
        Err(e) => {
            eprintln!("warren: cannot check the broker's open-files limit: {e}");
            return None;
        }
    }
    let authority = config.broker.url().parse::<AMQPUri>().ok()?.authority;
    let local = matches!(authority.host.as_str(), "127.0.0.1" | "localhost");
    if !local || authority.port != 5672 {
        return None;
    }
    let mut local = config.broker.clone();
    local.management_url = Some(LOCAL_MANAGEMENT_URL.to_string());
    Some((Management::from_config(&local).ok()??, false))
}

/// The tightest node's open-files check for the queues of `plan` that do not exist yet (those
/// that do already hold their handles), or `None` when the management API does not tell.
async fn open_files(config: &Config, plan: &Topology) -> Option<FileCheck> {
    let (management, configured) = management_for(config)?;
    let read = async {
        Ok::<_, warren_broker::BrokerError>((
            management.file_descriptors().await?,
            management.queues().await?,
        ))
    };
    let (nodes, queues) = match read.await {
        Ok(read) => read,
        Err(e) => {
            if configured {
                eprintln!("warren: cannot check the broker's open-files limit: {e}");
            }
            return None;
        }
    };
    let existing: HashSet<&str> = queues
        .iter()
        .filter(|q| q.vhost == management.vhost())
        .map(|q| q.name.as_str())
        .collect();
    let new = Topology {
        exchanges: vec![],
        queues: plan
            .queues
            .iter()
            .filter(|q| !existing.contains(q.name.as_str()))
            .cloned()
            .collect(),
        tokens: vec![],
    };
    let needed = QueueCounts::of(&new, &Names::new(&config.broker.namespace)).handles();
    capacity::check_files(&nodes, &queues, needed)
}

/// The lines `plan` and `apply` print about the namespace's size and the broker's files.
fn summary<'a>(
    ns: &'a str,
    counts: &'a QueueCounts,
    files: Option<&'a FileCheck>,
) -> impl Iterator<Item = String> + 'a {
    let mut types = vec![];
    for (n, kind) in [
        (counts.quorum, "quorum"),
        (counts.classic, "classic"),
        (counts.stream, "stream"),
    ] {
        if n > 0 {
            types.push(format!("{n} {kind}"));
        }
    }
    let head = format!(
        "namespace {ns} needs {} queues ({})",
        counts.total(),
        types.join(", ")
    );
    let pipelines = counts.pipelines.iter().map(|p| {
        format!(
            "  pipeline {}: {} step queues ({} steps x {} priorities x ({} shards + {} hot lanes))",
            p.pipeline, p.queues, p.steps, p.priorities, p.shards, p.hot_lanes
        )
    });
    let others = format!(
        "  delay queues: {}, dead-letter queue: {}, results stream: {}, control stream: {}, history stream: {}, schedules: {}",
        counts.delay, counts.dead_letter, counts.results, counts.control, counts.history, counts.schedules
    );
    let handles = format!(
        "open files: about {} handles on each broker node ({} per quorum queue, {} per stream, {} per classic queue: RabbitMQ 3.10 figures)",
        counts.handles(),
        capacity::HANDLES_PER_QUORUM_QUEUE,
        capacity::HANDLES_PER_STREAM,
        capacity::HANDLES_PER_CLASSIC_QUEUE,
    );
    let broker = match files {
        Some(check) => format!(
            "broker {}: open-files limit {} ({} usable), about {} in use ({} open files + {} per quorum queue there); {} more for the queues not there yet, {} left after",
            check.node.node,
            check.node.total,
            check.usable,
            check.in_use,
            check.node.used,
            capacity::HANDLES_PER_QUORUM_QUEUE,
            check.needed,
            check.left()
        ),
        None => "broker: open-files limit unknown (set [broker] management_url to check it)".into(),
    };
    std::iter::once(head)
        .chain(pipelines)
        .chain([others, handles, broker])
}

/// Says on stderr, before anything is declared, that the namespace would use up the broker's
/// file handles, and where the fix is.
fn warn_if_exhausted(files: Option<&FileCheck>) {
    if let Some(check) = files.filter(|c| c.exhausts()) {
        eprintln!("warren: warning: {}", exhausted_message(check));
    }
}

fn exhausted_message(check: &FileCheck) -> String {
    format!(
        "this namespace needs about {} more file handles, but broker node {} has about {} of its {} usable in use (limit {}): once they run out, every new connection hangs in the AMQP handshake. Raise the broker's open-files limit first: see {}",
        check.needed,
        check.node.node,
        check.in_use,
        check.usable,
        check.node.total,
        capacity::DOCS
    )
}

/// A failed or timed-out apply is often a broker out of file handles; say where to look unless
/// the error already does.
fn with_files_hint(e: anyhow::Error) -> anyhow::Error {
    if format!("{e:#}").contains("Open files") {
        return e;
    }
    e.context(format!(
        "topology apply failed; if the broker stopped answering, it may be out of open files (see {})",
        capacity::DOCS
    ))
}

fn counts_json(counts: &QueueCounts) -> Value {
    json!({
        "queues": counts.total(),
        "step_queues": counts.step_queues(),
        "pipelines": counts.pipelines.iter().map(|p| json!({
            "pipeline": p.pipeline,
            "queues": p.queues,
            "steps": p.steps,
            "priorities": p.priorities,
            "shards": p.shards,
            "hot_lanes": p.hot_lanes,
        })).collect::<Vec<_>>(),
        "delay": counts.delay,
        "dead_letter": counts.dead_letter,
        "results": counts.results,
        "control": counts.control,
        "history": counts.history,
        "schedules": counts.schedules,
        "quorum": counts.quorum,
        "classic": counts.classic,
        "stream": counts.stream,
        "handles": counts.handles(),
    })
}

fn files_json(check: &FileCheck) -> Value {
    json!({
        "node": check.node.node,
        "fd_total": check.node.total,
        "fd_used": check.node.used,
        "in_use": check.in_use,
        "usable": check.usable,
        "needed": check.needed,
        "left": check.left(),
        "exhausts": check.exhausts(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_broker::capacity::{check_files, PipelineQueues};
    use warren_broker::NodeFiles;

    fn counts() -> QueueCounts {
        QueueCounts {
            pipelines: vec![PipelineQueues {
                pipeline: "reports".into(),
                steps: 3,
                priorities: 3,
                shards: 8,
                hot_lanes: 2,
                queues: 90,
            }],
            delay: 4,
            dead_letter: 1,
            results: 1,
            control: 1,
            history: 1,
            schedules: 3,
            quorum: 95,
            classic: 0,
            stream: 2,
        }
    }

    #[test]
    fn summary_gives_the_queues_by_pipeline_and_type_and_the_brokers_files() {
        let files = check_files(
            &[NodeFiles {
                node: "rabbit@a".into(),
                total: 1024,
                used: 40,
            }],
            &[],
            233,
        );
        let lines: Vec<_> = summary("ns", &counts(), files.as_ref()).collect();
        assert_eq!(
            lines[0],
            "namespace ns needs 97 queues (95 quorum, 2 stream)"
        );
        assert_eq!(
            lines[1],
            "  pipeline reports: 90 step queues (3 steps x 3 priorities x (8 shards + 2 hot lanes))"
        );
        assert!(lines[2].contains("delay queues: 4"), "{lines:?}");
        assert!(lines[3].contains("about 289 handles"), "{lines:?}");
        assert!(
            lines[4].contains("limit 1024 (921 usable), about 40 in use (40 open files")
                && lines[4].ends_with("648 left after"),
            "{lines:?}"
        );
        let unknown: Vec<_> = summary("ns", &counts(), None).collect();
        assert!(unknown[4].contains("management_url"), "{unknown:?}");
    }

    #[test]
    fn the_warning_names_the_node_the_figures_and_the_fix() {
        let node = |total| NodeFiles {
            node: "rabbit@a".into(),
            total,
            used: 40,
        };
        let tight = check_files(&[node(1024)], &[], 2_175).unwrap();
        assert!(tight.exhausts());
        let message = exhausted_message(&tight);
        assert!(
            message.contains("2175 more file handles")
                && message.contains("rabbit@a")
                && message.contains("limit 1024")
                && message.contains("docs/deploy.md, \"Open files\""),
            "{message}"
        );
        assert!(!check_files(&[node(20_000)], &[], 2_175).unwrap().exhausts());
    }

    #[test]
    fn a_failed_apply_points_at_the_docs_once() {
        let hinted = with_files_hint(anyhow::anyhow!("timed out"));
        let text = format!("{hinted:#}");
        assert!(
            text.contains("Open files") && text.ends_with("timed out"),
            "{text}"
        );
        let again = format!("{:#}", with_files_hint(hinted));
        assert_eq!(again.matches("Open files").count(), 1, "{again}");
    }
}
