//! Reads the depth of the supervised step queues each tick: ready messages by passive declare
//! (see `warren_broker::depth`), plus, when `[broker] management_url` is set, the messages
//! workers hold unacked. Each failed attempt to connect is logged with its cause (one a tick,
//! the tick being the retry pace); a connected broker or a management API that cannot be read
//! is logged once, and once again when it can be read again.

use std::time::Duration;

use tracing::{info, warn};
use warren_broker::depth::{add_unacked, read_depths, QueueDepth};
use warren_broker::{Broker, Management, Names, StepRoute};
use warren_common::Config;

#[derive(Debug)]
pub(crate) struct Depths {
    queues: Vec<StepRoute>,
    /// Connected at the first read, and again after a lost connection.
    broker: Option<Broker>,
    /// Connection attempts failed in a row.
    connect_failures: u32,
    broker_down_logged: bool,
    /// Where unacked counts come from, if configured.
    management: Option<Management>,
    management_down_logged: bool,
}

impl Depths {
    pub(crate) fn new(queues: Vec<StepRoute>, management: Option<Management>) -> Self {
        Self {
            queues,
            broker: None,
            connect_failures: 0,
            broker_down_logged: false,
            management,
            management_down_logged: false,
        }
    }

    /// The depth of each queue, in the order of the queues it was given, or `None` if the broker
    /// could not be reached (within `[broker] connect_timeout`) or read (within `patience`) this
    /// time.
    pub(crate) async fn read(
        &mut self,
        config: &Config,
        patience: Duration,
    ) -> Option<Vec<QueueDepth>> {
        if self.broker.is_none() {
            // Outside `patience`: the connect has its own deadline, and its error says why.
            self.broker = Some(self.connect(config).await?);
        }
        match tokio::time::timeout(patience, self.read_once(config)).await {
            Ok(depths) => depths,
            Err(_) => {
                self.broker = None;
                self.broker_unreadable("no answer from the broker");
                None
            }
        }
    }

    async fn connect(&mut self, config: &Config) -> Option<Broker> {
        match Broker::connect(&config.broker).await {
            Ok(broker) => {
                if self.connect_failures > 0 {
                    info!(
                        tries = self.connect_failures,
                        "Connected to the broker again."
                    );
                }
                self.connect_failures = 0;
                Some(broker)
            }
            Err(e) => {
                self.connect_failures += 1;
                warn!(error = %e, tries = self.connect_failures,
                    "Cannot connect to read queue depths; keeping the pools as they are, trying again next tick.");
                // So that the next good read says so.
                self.broker_down_logged = true;
                None
            }
        }
    }

    async fn read_once(&mut self, config: &Config) -> Option<Vec<QueueDepth>> {
        let broker = self.broker.as_ref()?;
        let mut depths = match read_depths(broker, &self.queues).await {
            Ok(d) => d,
            Err(e) => {
                if e.is_connection_lost() {
                    if let Some(b) = self.broker.take() {
                        b.close().await;
                    }
                }
                self.broker_unreadable(&e.to_string());
                return None;
            }
        };
        if self.broker_down_logged {
            info!("Reading queue depths again.");
            self.broker_down_logged = false;
        }
        if let Some(management) = &self.management {
            // Without it the backlog is the ready messages alone, as without a management_url.
            let prefix = Names::new(&config.broker.namespace).step_queue_prefix();
            match add_unacked(management, &prefix, &mut depths).await {
                Ok(()) if self.management_down_logged => {
                    info!("Reading unacked counts again.");
                    self.management_down_logged = false;
                }
                Ok(()) => {}
                Err(e) if !self.management_down_logged => {
                    warn!(error = %e, "Cannot read unacked counts; sizing on ready messages alone.");
                    self.management_down_logged = true;
                }
                Err(_) => {}
            }
        }
        Some(depths)
    }

    fn broker_unreadable(&mut self, error: &str) {
        if !self.broker_down_logged {
            warn!(
                error,
                "Cannot read queue depths; keeping the pools as they are."
            );
            self.broker_down_logged = true;
        }
    }

    pub(crate) async fn close(&mut self) {
        if let Some(broker) = self.broker.take() {
            broker.close().await;
        }
    }
}
