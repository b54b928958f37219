//! What the console reads from the broker besides the history, every few seconds: the depth
//! of every step queue and of the dead-letter queue, each tenant's estimated backlog from the
//! workers' lane reports on the control stream, the workers themselves from their presence
//! reports there, and the schedules' state from their ledger. The
//! newest reading is kept; a failed one keeps the one before and says why.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Serialize;
use warren_broker::control;
use warren_broker::depth::{read_depths, ready_messages};
use warren_broker::tenants::{estimate, TenantBacklog};
use warren_broker::workers::WorkerReport;
use warren_broker::{Broker, StepRoute};
use warren_producer::schedules::{self, ScheduleStatus};
use warren_producer::Client;

/// How often the broker is read.
pub(crate) const EVERY: Duration = Duration::from_secs(3);

/// How far back the workers' lane and presence reports are read (they report every 10 s).
const REPORTS_LOOK_BACK: Duration = Duration::from_secs(60);

/// Ready messages of one step queue.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Depth {
    pub(crate) pipeline: String,
    pub(crate) step: String,
    pub(crate) priority: &'static str,
    pub(crate) lane: String,
    pub(crate) ready: u32,
}

/// The newest reading.
#[derive(Debug, Default, Clone)]
pub(crate) struct Reading {
    /// Step queues holding messages (a missing queue reads as empty).
    pub(crate) depths: Vec<Depth>,
    pub(crate) dead_letters: Option<u32>,
    pub(crate) tenant_backlogs: Vec<TenantBacklog>,
    /// The newest report of each worker heard from lately; which are live is decided when
    /// shown (`warren_broker::workers::live`), so one that stops reporting drops out even while
    /// the broker cannot be read.
    pub(crate) workers: Vec<WorkerReport>,
    pub(crate) schedules: Vec<ScheduleStatus>,
    /// Why the last reading failed, if it did.
    pub(crate) error: Option<String>,
}

/// Reads the broker every [`EVERY`] until the process ends.
pub(crate) async fn probe(client: Arc<Client>, reading: Arc<RwLock<Reading>>) {
    let mut broker: Option<Broker> = None;
    let mut ticks = tokio::time::interval(EVERY);
    loop {
        ticks.tick().await;
        if broker.is_none() {
            match Broker::connect(&client.config().broker).await {
                Ok(b) => broker = Some(b),
                Err(e) => {
                    reading.write().expect("reading lock").error = Some(e.to_string());
                    continue;
                }
            }
        }
        let fresh = read(&client, broker.as_ref().expect("set above")).await;
        let mut kept = reading.write().expect("reading lock");
        match fresh {
            Ok(fresh) => *kept = fresh,
            Err(e) => {
                kept.error = Some(e);
                broker = None;
            }
        }
    }
}

async fn read(client: &Client, broker: &Broker) -> Result<Reading, String> {
    let config = client.config();
    let routes = StepRoute::all(config);
    let depths = read_depths(broker, &routes)
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|d| d.ready.unwrap_or(0) > 0)
        .map(|d| Depth {
            lane: d.route.lane.to_string(),
            priority: d.route.priority.as_str(),
            pipeline: d.route.pipeline,
            step: d.route.step,
            ready: d.ready.unwrap_or(0),
        })
        .collect();
    let dead_letters = ready_messages(broker, &broker.names().dlq())
        .await
        .map_err(|e| e.to_string())?;
    let recent = control::read_recent(broker, REPORTS_LOOK_BACK)
        .await
        .map_err(|e| e.to_string())?;
    let schedules = match config.schedules.is_empty() {
        true => Vec::new(),
        false => schedules::status(client).await.map_err(|e| e.to_string())?,
    };
    Ok(Reading {
        depths,
        dead_letters,
        tenant_backlogs: estimate(&recent.digests),
        workers: recent.workers,
        schedules,
        error: None,
    })
}
