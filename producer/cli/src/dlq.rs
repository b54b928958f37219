//! `warren dlq list|show|replay|purge`.

use std::time::{Duration, UNIX_EPOCH};

use anyhow::bail;
use clap::{ArgGroup, Args, Subcommand};
use serde_json::json;
use warren_common::dead_letter::Reason;
use warren_common::Config;
use warren_producer::{Client, DeadLetter, DlqFilter, ReplayOptions};

use crate::output::{count, outln};
use crate::{Exit, EXIT_NOT_FOUND};

#[derive(Debug, Args)]
pub(crate) struct DlqArgs {
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, Subcommand)]
enum Action {
    /// List the dead letters, oldest first.
    List {
        #[command(flatten)]
        by: ListFilter,
    },
    /// Show one dead letter (or every one with that id) in full: error, input, headers.
    Show {
        /// The dead letter's id (the job id).
        id: String,
    },
    /// Publish dead letters back to the step that failed, with their input as it was.
    Replay {
        #[command(flatten)]
        select: Selection,
        /// Start the failed step over at attempt 1 (default: the next attempt).
        #[arg(long)]
        reset_attempts: bool,
    },
    /// Delete dead letters for good.
    Purge {
        #[command(flatten)]
        select: Selection,
        /// Confirm the deletion.
        #[arg(long)]
        yes: bool,
    },
}

/// Which dead letters: those of a pipeline, a tenant, a reason (all of them when none is given).
#[derive(Debug, Args)]
struct ListFilter {
    /// Only this pipeline's.
    #[arg(long)]
    pipeline: Option<String>,
    /// Only this tenant's.
    #[arg(long)]
    tenant: Option<String>,
    #[arg(long, help = reason_help())]
    reason: Option<String>,
}

/// `--reason`'s help: warren's own reasons (another tool's dead letters may carry any text).
fn reason_help() -> String {
    let reasons: Vec<_> = Reason::ALL.iter().map(|r| format!("`{r}`")).collect();
    format!("Only this reason ({}, ...)", reasons.join(", "))
}

impl ListFilter {
    fn filter(self, id: Option<String>) -> DlqFilter {
        DlqFilter {
            id,
            pipeline: self.pipeline,
            tenant: self.tenant,
            reason: self.reason,
            ids: None,
        }
    }
}

/// Which dead letters a replay or purge touches: one id, or a filter, or --all. (The group is
/// spelled out: clap's derive leaves a group empty when the struct flattens another.)
#[derive(Debug, Args)]
#[group(skip)]
#[command(group(
    ArgGroup::new("selection")
        .required(true)
        .multiple(true)
        .args(["id", "all", "pipeline", "tenant", "reason"])
))]
struct Selection {
    /// The dead letter's id (the job id).
    #[arg(conflicts_with = "all")]
    id: Option<String>,
    /// Every dead letter.
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    by: ListFilter,
}

impl Selection {
    fn filter(self) -> DlqFilter {
        self.by.filter(self.id)
    }
}

pub(crate) async fn run(args: DlqArgs, config: Config, json: bool) -> anyhow::Result<()> {
    if let Action::Purge { yes: false, .. } = args.action {
        bail!("this deletes the selected dead letters for good; add --yes");
    }
    let client = Client::connect(config).await?;
    let outcome = act(&client, args.action, json).await;
    client.close().await;
    outcome
}

async fn act(client: &Client, action: Action, json: bool) -> anyhow::Result<()> {
    match action {
        Action::List { by } => {
            let letters = client.dlq_list(&by.filter(None)).await?;
            if json {
                letters.iter().for_each(|l| outln!("{}", to_json(l)));
            } else {
                print_table(&letters);
            }
        }
        Action::Show { id } => {
            let letters = client.dlq_list(&DlqFilter::id(&id)).await?;
            if letters.is_empty() {
                return Err(Exit(EXIT_NOT_FOUND, format!("no dead letter with id {id}")).into());
            }
            for letter in &letters {
                if json {
                    outln!("{}", to_json(letter));
                } else {
                    print_detail(letter);
                }
            }
        }
        Action::Replay {
            select,
            reset_attempts,
        } => {
            let options = ReplayOptions { reset_attempts };
            let report = client.dlq_replay(&select.filter(), options).await?;
            if json {
                outln!(
                    "{}",
                    serde_json::to_string(&report).expect("reports serialise")
                );
            } else {
                for l in &report.replayed {
                    outln!(
                        "replayed {} ({}, {}) at step {}",
                        l.id,
                        l.tenant.as_deref().unwrap_or("-"),
                        l.pipeline.as_deref().unwrap_or("-"),
                        l.step.as_deref().unwrap_or("-")
                    );
                }
                for s in &report.skipped {
                    eprintln!("skipped {}: {}", s.letter.id, s.why);
                }
                outln!(
                    "{} replayed, {} left in the dead-letter queue",
                    report.replayed.len(),
                    report.skipped.len()
                );
            }
            if report.replayed.is_empty() && report.skipped.is_empty() {
                return Err(Exit(EXIT_NOT_FOUND, "no dead letter matched".into()).into());
            }
        }
        Action::Purge { select, .. } => {
            let purged = client.dlq_purge(&select.filter()).await?;
            if json {
                outln!("{}", json!({"purged": purged.len()}));
            } else {
                outln!("purged {}", count(purged.len(), "dead letter"));
            }
        }
    }
    Ok(())
}

fn to_json(letter: &DeadLetter) -> String {
    serde_json::to_string(letter).expect("dead letters serialise")
}

fn print_table(letters: &[DeadLetter]) {
    if letters.is_empty() {
        outln!("no dead letters");
        return;
    }
    outln!(
        "{:<36} {:<16} {:<12} {:<10} {:>3} {:<20} {:<20} error",
        "id",
        "tenant",
        "pipeline",
        "step",
        "att",
        "reason",
        "failed at"
    );
    for l in letters {
        let error: String = l
            .error
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(60)
            .collect();
        outln!(
            "{:<36} {:<16} {:<12} {:<10} {:>3} {:<20} {:<20} {error}",
            l.id,
            l.tenant.as_deref().unwrap_or("-"),
            l.pipeline.as_deref().unwrap_or("-"),
            l.step.as_deref().unwrap_or("-"),
            l.attempts.map_or("-".into(), |a| a.to_string()),
            l.reason,
            l.failed_at.map_or("-".into(), time),
        );
    }
    outln!("{}", count(letters.len(), "dead letter"));
}

fn print_detail(l: &DeadLetter) {
    let or_dash = |v: Option<&str>| v.unwrap_or("-").to_string();
    outln!("id:           {}", l.id);
    outln!("reason:       {}", l.reason);
    outln!("tenant:       {}", or_dash(l.tenant.as_deref()));
    outln!("pipeline:     {}", or_dash(l.pipeline.as_deref()));
    outln!("step:         {}", or_dash(l.step.as_deref()));
    outln!(
        "priority:     {}",
        l.priority.map_or("-".into(), |p| p.to_string())
    );
    outln!(
        "attempts:     {}",
        l.attempts.map_or("-".into(), |a| a.to_string())
    );
    outln!("queue:        {}", or_dash(l.queue.as_deref()));
    if let Some(parts) = l.bundled_parts {
        outln!("bundle of:    {parts} fan-out parts (the fields here are the first's)");
    }
    outln!("submitted at: {}", l.submitted_at.map_or("-".into(), time));
    outln!("failed at:    {}", l.failed_at.map_or("-".into(), time));
    outln!("error:");
    for line in l.error.lines() {
        outln!("  {line}");
    }
    match (&l.input, &l.raw) {
        (Some(input), _) => outln!(
            "input:\n{}",
            serde_json::to_string_pretty(input).expect("JSON values serialise")
        ),
        (None, Some(raw)) => outln!("raw body ({} bytes, as text):\n{raw}", l.body_bytes),
        (None, None) => {}
    }
}

fn time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::{Cli, Command};

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(["warren", "dlq"].iter().chain(args))
    }

    #[test]
    fn a_replay_or_purge_needs_a_selection_and_a_filter_is_one() {
        assert!(parse(&["replay"]).is_err());
        assert!(parse(&["purge", "--yes"]).is_err());
        assert!(parse(&["replay", "some-id", "--all"]).is_err());
        for selection in [
            &["replay", "some-id"][..],
            &["replay", "--all"],
            &["replay", "--pipeline", "p"],
            &["purge", "--tenant", "t", "--yes"],
            &["purge", "--reason", "oversized", "--yes"],
        ] {
            let cli = parse(selection).unwrap_or_else(|e| panic!("{selection:?}: {e}"));
            assert!(matches!(cli.command, Command::Dlq(_)));
        }
        assert!(parse(&["list"]).is_ok());
    }

    #[test]
    fn reason_help_lists_warren_reasons() {
        let help = super::reason_help();
        assert!(help.contains("`unknown-pipeline`"), "{help}");
        assert!(help.contains("`delivery-limit`"), "{help}");
    }
}
