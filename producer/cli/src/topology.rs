//! `warren topology apply|delete|plan`.

use crate::output::outln;
use anyhow::bail;
use clap::{Args, Subcommand};
use serde_json::json;
use warren_broker::{Broker, Topology};
use warren_common::Config;

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
    match args.action {
        Action::Plan => {
            if json {
                let queues: Vec<_> = plan.queues.iter().map(|q| &q.name).collect();
                let exchanges: Vec<_> = plan.exchanges.iter().map(|e| &e.name).collect();
                outln!("{}", json!({"exchanges": exchanges, "queues": queues}));
            } else {
                plan.exchanges
                    .iter()
                    .for_each(|e| outln!("exchange {} ({})", e.name, e.kind));
                plan.queues
                    .iter()
                    .for_each(|q| outln!("queue    {}", q.name));
            }
        }
        Action::Apply => {
            let broker = Broker::connect(&config.broker).await?;
            plan.declare(&broker).await?;
            broker.close().await;
            report(json, "applied", ns, &plan);
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
