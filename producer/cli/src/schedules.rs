//! `warren schedules [trigger|pause|resume|backfill]`.

use anyhow::Context;
use chrono::{DateTime, SecondsFormat, Utc};
use clap::{Args, Subcommand};
use serde_json::json;
use warren_common::Config;
use warren_producer::schedules::{self, ScheduleStatus};
use warren_producer::Client;

use crate::output::{count, outln};
use crate::{Exit, EXIT_NOT_FOUND, EXIT_USAGE};

#[derive(Debug, Args)]
pub(crate) struct SchedulesArgs {
    #[command(subcommand)]
    action: Option<Action>,
}

#[derive(Debug, Subcommand)]
enum Action {
    /// Fire a schedule now, whatever its cadence: fresh jobs each time (not one of its slots).
    Trigger { name: String },
    /// Stop a schedule firing until `resume`.
    Pause { name: String },
    /// Let a paused schedule fire again (missed slots are caught up as after an outage).
    Resume { name: String },
    /// Fire every slot of a schedule between two times (RFC 3339, both included), oldest first.
    Backfill {
        name: String,
        #[arg(long, value_parser = parse_time)]
        from: DateTime<Utc>,
        #[arg(long, value_parser = parse_time)]
        to: DateTime<Utc>,
    },
}

fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("not an RFC 3339 time (2026-01-31T02:00:00Z): {e}"))
}

fn time(t: Option<DateTime<Utc>>) -> String {
    t.map_or("-".into(), |t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
}

pub(crate) async fn run(args: SchedulesArgs, config: Config, json: bool) -> anyhow::Result<()> {
    // What the config alone answers needs no broker.
    if args.action.is_none() && config.schedules.is_empty() {
        outln!(
            "{}",
            if json {
                "[]"
            } else {
                "no schedules in the config"
            }
        );
        return Ok(());
    }
    if let Some(Action::Backfill { from, to, .. }) = &args.action {
        if from > to {
            let (from, to) = (time(Some(*from)), time(Some(*to)));
            let why = format!("--from {from} is after --to {to}; nothing to backfill");
            return Err(Exit(EXIT_USAGE, why).into());
        }
    }
    if let Some(name) = match &args.action {
        Some(Action::Trigger { name })
        | Some(Action::Pause { name })
        | Some(Action::Resume { name })
        | Some(Action::Backfill { name, .. }) => Some(name),
        None => None,
    } {
        if config.schedule(name).is_none() {
            return Err(Exit(
                EXIT_NOT_FOUND,
                format!("no schedule named `{name}` in the config"),
            )
            .into());
        }
    }
    let client = Client::connect(config).await.context("connect")?;
    let result = act(&client, args.action, json).await;
    client.close().await;
    result
}

async fn act(client: &Client, action: Option<Action>, json: bool) -> anyhow::Result<()> {
    match action {
        None => list(&schedules::status(client).await?, json)?,
        Some(Action::Trigger { name }) => {
            let jobs = schedules::trigger(client, &name).await?;
            if json {
                outln!("{}", json!({ "schedule": name, "jobs": jobs }));
            } else {
                outln!("fired {name}: {}", count(jobs.len(), "job"));
                for id in jobs {
                    outln!("  {id}");
                }
            }
        }
        Some(Action::Pause { name }) => {
            schedules::pause(client, &name).await?;
            outln!(
                "{}",
                if json {
                    json!({ "schedule": name, "paused": true }).to_string()
                } else {
                    format!("paused {name}")
                }
            );
        }
        Some(Action::Resume { name }) => {
            schedules::resume(client, &name).await?;
            outln!(
                "{}",
                if json {
                    json!({ "schedule": name, "paused": false }).to_string()
                } else {
                    format!("resumed {name}")
                }
            );
        }
        Some(Action::Backfill { name, from, to }) => {
            let fired = schedules::backfill(client, &name, from, to).await?;
            if json {
                let slots: Vec<_> = fired
                    .iter()
                    .map(|(slot, jobs)| json!({ "slot": slot, "jobs": jobs }))
                    .collect();
                outln!("{}", json!({ "schedule": name, "slots": slots }));
            } else {
                let jobs: usize = fired.iter().map(|(_, jobs)| jobs.len()).sum();
                outln!(
                    "backfilled {name}: {}, {}",
                    count(fired.len(), "slot"),
                    count(jobs, "job")
                );
            }
        }
    }
    Ok(())
}

fn list(all: &[ScheduleStatus], json: bool) -> anyhow::Result<()> {
    if json {
        outln!("{}", serde_json::to_string(all)?);
        return Ok(());
    }
    for s in all {
        let state = if s.paused { "paused" } else { "active" };
        outln!(
            "{}  {}  {} ({})  pipeline {}  tenants {}",
            s.name,
            state,
            s.when,
            s.timezone,
            s.pipeline,
            s.tenants.join(",")
        );
        outln!(
            "  next {}  last slot {}  last fire {}",
            time(s.next),
            time(s.last_slot),
            match s.last_fire_kind {
                Some(kind) => format!(
                    "{} ({}, {})",
                    time(s.last_fire),
                    kind.as_str(),
                    count(s.last_fire_jobs.len(), "job")
                ),
                None => "-".into(),
            }
        );
    }
    Ok(())
}
