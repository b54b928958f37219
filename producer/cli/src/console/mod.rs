//! `warren console`: the web console. It folds the history stream from its first retained
//! event and follows it live ([`follow`], [`state`]), reads queue depths, tenants' backlogs
//! and the schedules from the broker every few seconds ([`probe`]), and serves pages and the
//! JSON API behind them ([`routes`], [`views`], the `templates/`). Credentials and CSRF are
//! [`auth`]. Nothing is kept anywhere but in RabbitMQ: a restarted console, or a second one,
//! reads the same streams and shows the same.

mod auth;
mod follow;
mod probe;
mod routes;
mod state;
mod views;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::Args;
use minijinja::Environment;
use warren_common::{now_ms, Config, JobId};
use warren_producer::Client;

use crate::output::outln;
use crate::{Exit, EXIT_USAGE};
use auth::{Credentials, Csrf};
use follow::Progress;
use probe::Reading;
use state::Jobs;
use views::Health;

#[derive(Debug, Args)]
pub(crate) struct ConsoleArgs {
    /// Address to serve on. Anything but a loopback address needs credentials:
    /// WARREN_CONSOLE_TOKEN, WARREN_CONSOLE_BASIC_AUTH=user:password, or --credentials-file.
    #[arg(long, default_value = "127.0.0.1:9400")]
    listen: SocketAddr,
    /// A file holding the token, or user:password for basic auth (instead of the environment).
    #[arg(long)]
    credentials_file: Option<PathBuf>,
}

/// Everything the routes share.
pub(crate) struct Console {
    jobs: Arc<RwLock<Jobs>>,
    progress: Arc<RwLock<Progress>>,
    reading: Arc<RwLock<Reading>>,
    client: Arc<Client>,
    templates: Environment<'static>,
    csrf: Csrf,
    credentials: Credentials,
    /// Outputs of succeeded jobs read from the results stream, so a page's live refresh does
    /// not read the stream again.
    outputs: Mutex<HashMap<JobId, serde_json::Value>>,
}

/// Most outputs [`Console::outputs`] keeps; it starts afresh past that.
const OUTPUTS_KEPT: usize = 1000;

impl Console {
    fn health(&self) -> Health {
        // One lock at a time: the follower takes the jobs' lock, then the progress's.
        let (ready, history_error) = {
            let progress = self.progress.read().expect("progress lock");
            (progress.ready, progress.error.clone())
        };
        let (events, jobs) = {
            let jobs = self.jobs.read().expect("jobs lock");
            (jobs.events, jobs.len())
        };
        let broker_error = self.reading.read().expect("reading lock").error.clone();
        Health {
            ready: ready.is_some(),
            ready_after_ms: ready.map(|d| d.as_millis() as u64),
            events,
            jobs,
            errors: history_error
                .map(|e| format!("history: {e}"))
                .into_iter()
                .chain(broker_error.map(|e| format!("broker: {e}")))
                .collect(),
        }
    }

    /// `f` of the jobs and the newest broker reading, under their locks.
    fn view<R>(&self, f: impl FnOnce(&Jobs, &Reading) -> R) -> R {
        let jobs = self.jobs.read().expect("jobs lock");
        let reading = self.reading.read().expect("reading lock");
        f(&jobs, &reading)
    }

    /// A succeeded job's output: it is in the results stream, not in the history.
    async fn output(&self, id: JobId) -> Option<serde_json::Value> {
        if let Some(known) = self.outputs.lock().expect("outputs lock").get(&id) {
            return Some(known.clone());
        }
        let result = self.client.wait(id, views::OUTPUT_WAIT).await.ok()?;
        let mut outputs = self.outputs.lock().expect("outputs lock");
        if outputs.len() >= OUTPUTS_KEPT {
            outputs.clear();
        }
        outputs.insert(id, result.output.clone());
        Some(result.output)
    }

    /// Reads the schedules again now (after a pause or resume), so the page shows it at once.
    async fn refresh_schedules(&self) {
        if let Ok(fresh) = warren_producer::schedules::status(&self.client).await {
            self.reading.write().expect("reading lock").schedules = fresh;
        }
    }
}

pub(crate) async fn run(args: ConsoleArgs, config: Config) -> anyhow::Result<()> {
    if !config.history.enabled {
        let why = "the console reads the job history, which is off in this config; set `[history] enabled = true` in warren.toml and restart the workers";
        return Err(Exit(EXIT_USAGE, why.into()).into());
    }
    let credentials = Credentials::load(args.credentials_file.as_deref(), |key| {
        std::env::var(key).ok()
    })
    .map_err(|e| Exit(EXIT_USAGE, e))?;
    credentials
        .check_listen(args.listen)
        .map_err(|e| Exit(EXIT_USAGE, e))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("--listen {}", args.listen))?;
    let retention = config.history.retention;
    let client = Arc::new(Client::connect(config.clone()).await.context("connect")?);
    let console = Arc::new(Console {
        jobs: Arc::default(),
        progress: Arc::default(),
        reading: Arc::default(),
        client: client.clone(),
        templates: templates(),
        csrf: Csrf::fresh(),
        credentials,
        outputs: Mutex::default(),
    });
    tokio::spawn(follow::follow(
        config,
        console.jobs.clone(),
        console.progress.clone(),
    ));
    tokio::spawn(probe::probe(client, console.reading.clone()));
    tokio::spawn(forget_expired(console.clone(), retention));
    let addr = listener.local_addr()?;
    outln!("warren console: http://{addr}/");
    axum::serve(listener, routes::router(console))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

/// Drops the jobs the stream has dropped too (older than its retention), once an hour.
async fn forget_expired(console: Arc<Console>, retention: std::time::Duration) {
    let mut hourly = tokio::time::interval(std::time::Duration::from_secs(3600));
    loop {
        hourly.tick().await;
        let cutoff = now_ms().saturating_sub(retention.as_millis() as u64);
        console
            .jobs
            .write()
            .expect("jobs lock")
            .forget_before(cutoff);
    }
}

/// The page templates; `.html` ones escape everything they print.
fn templates() -> Environment<'static> {
    let mut env = Environment::new();
    for (name, text) in [
        ("base.html", include_str!("templates/base.html")),
        ("overview.html", include_str!("templates/overview.html")),
        ("tenants.html", include_str!("templates/tenants.html")),
        ("jobs.html", include_str!("templates/jobs.html")),
        ("rows.html", include_str!("templates/rows.html")),
        ("job.html", include_str!("templates/job.html")),
        ("failures.html", include_str!("templates/failures.html")),
        ("schedules.html", include_str!("templates/schedules.html")),
    ] {
        env.add_template(name, text)
            .unwrap_or_else(|e| panic!("template {name}: {e:#}"));
    }
    env.add_filter("time", |ms: Option<u64>| match ms {
        Some(ms) => DateTime::<Utc>::from_timestamp_millis(ms as i64)
            .map_or_else(String::new, |t| t.format("%Y-%m-%d %H:%M:%S").to_string()),
        None => "-".to_string(),
    });
    env.add_filter("ms", |ms: Option<u64>| match ms {
        None => "-".to_string(),
        Some(ms) if ms < 1000 => format!("{ms} ms"),
        Some(ms) if ms < 120_000 => format!("{:.1} s", ms as f64 / 1000.0),
        Some(ms) => format!("{:.1} min", ms as f64 / 60_000.0),
    });
    env
}
