//! Publishing with publisher confirms: the one place that decides whether the broker took a
//! message. A confirm means the message is stored (on a quorum of nodes, for quorum queues);
//! anything else is an error, never a silent success. Producers, worker hand-offs and dead
//! lettering all go through here, so "confirm before ack" exists once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel};
use lapin::{Confirmation, PublisherConfirm};
use warren_common::backoff::Backoff;
use warren_common::now_ms;

use crate::connection::Broker;
use crate::error::{BrokerError, PublishError};

/// MIME type of every warren message body.
pub const CONTENT_TYPE: &str = "application/msgpack";

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub body: &'a [u8],
    pub properties: BasicProperties,
}

impl<'a> Outgoing<'a> {
    /// A persistent MessagePack message, `message_id` set to the job id.
    pub fn persistent(exchange: &'a str, routing_key: &'a str, body: &'a [u8], id: &str) -> Self {
        let properties = BasicProperties::default()
            .with_content_type(CONTENT_TYPE.into())
            .with_delivery_mode(2)
            .with_message_id(id.into())
            .with_timestamp(now_ms() / 1000);
        Self {
            exchange,
            routing_key,
            body,
            properties,
        }
    }

    /// Adds string headers (dead-letter reasons and the like).
    pub fn with_headers(mut self, headers: &[(&str, String)]) -> Self {
        let mut table = self.properties.headers().clone().unwrap_or_default();
        for (key, value) in headers {
            table.insert(
                ShortString::from(*key),
                AMQPValue::LongString(value.as_str().into()),
            );
        }
        self.properties = self.properties.with_headers(table);
        self
    }
}

/// Reads a string header set by [`Outgoing::with_headers`].
pub fn header(properties: &BasicProperties, key: &str) -> Option<String> {
    let headers: &FieldTable = properties.headers().as_ref()?;
    match headers.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// How long a publish waits for its confirm before it counts as failed. A confirm that never
/// comes leaves the caller's input unacked, so the broker redelivers it: a duplicate at worst.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(60);

/// How long getting a channel keeps reconnecting (with backoff) before it gives up. Nothing has
/// been sent at that point, so retrying cannot duplicate a message.
pub const RECONNECT_PATIENCE: Duration = Duration::from_secs(30);

/// A confirm-mode channel that reopens itself when the broker closed it (a channel error on one
/// publish must not poison every later one) and reconnects, with backoff, when the connection
/// is gone. Publishes are mandatory, so an unroutable message comes back as
/// [`PublishError::Unroutable`].
///
/// A channel on which a confirm did not come in time is given up: closed, and the next publish
/// opens a fresh one. On RabbitMQ 3.10 a channel whose stream lost its leader (a node of a
/// cluster went down) can stop confirming that stream's messages for good; a fresh channel
/// writes to the new leader.
pub struct Publisher {
    broker: Broker,
    line: Mutex<Line>,
    patience: Duration,
    confirm_patience: Duration,
}

/// One confirm channel, and whether a publish on it gave up waiting for its confirm.
#[derive(Clone)]
struct Line {
    channel: Channel,
    given_up: Arc<AtomicBool>,
}

impl Line {
    fn new(channel: Channel) -> Self {
        Self {
            channel,
            given_up: Arc::new(AtomicBool::new(false)),
        }
    }

    fn usable(&self) -> bool {
        self.channel.status().connected() && !self.given_up.load(Ordering::Acquire)
    }

    /// Marks the channel given up and closes it: its other pending confirms fail at once (as
    /// [`PublishError::Unconfirmed`]) instead of each waiting out its own timeout.
    async fn give_up(&self) {
        if self.given_up.swap(true, Ordering::AcqRel) {
            return;
        }
        let closing = self
            .channel
            .close(200, "no publisher confirm in time".into());
        // A broker that does not answer the close is why we are here; the flag is enough.
        let _ = tokio::time::timeout(Duration::from_secs(5), closing).await;
    }
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").finish_non_exhaustive()
    }
}

impl Publisher {
    pub async fn new(broker: &Broker) -> Result<Self, BrokerError> {
        Ok(Self {
            line: Mutex::new(Line::new(broker.confirm_channel().await?)),
            broker: broker.clone(),
            patience: RECONNECT_PATIENCE,
            confirm_patience: CONFIRM_TIMEOUT,
        })
    }

    /// How long to keep reconnecting before a publish fails (default [`RECONNECT_PATIENCE`]).
    pub fn reconnect_patience(mut self, patience: Duration) -> Self {
        self.patience = patience;
        self
    }

    /// How long a publish waits for its confirm (default [`CONFIRM_TIMEOUT`]) before its
    /// channel is given up and the publish fails as [`PublishError::Unconfirmed`].
    pub fn confirm_patience(mut self, patience: Duration) -> Self {
        self.confirm_patience = patience;
        self
    }

    async fn live_line(&self) -> Result<Line, BrokerError> {
        let current = self.line.lock().expect("publisher lock").clone();
        if current.usable() {
            return Ok(current);
        }
        let deadline = Instant::now() + self.patience;
        let mut backoff = Backoff::reconnect();
        let fresh = loop {
            match self.broker.confirm_channel().await {
                Ok(channel) => break Line::new(channel),
                Err(e) if e.is_connection_lost() && Instant::now() < deadline => {
                    let wait = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64,
                        "Broker unavailable; reconnecting.");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => return Err(e),
            }
        };
        // Another publish may have replaced it meanwhile: keep one channel, not two.
        let kept = {
            let mut line = self.line.lock().expect("publisher lock");
            if line.usable() {
                Some(line.clone())
            } else {
                *line = fresh.clone();
                None
            }
        };
        match kept {
            Some(kept) => {
                let _ = fresh.channel.close(200, "not needed".into()).await;
                Ok(kept)
            }
            None => Ok(fresh),
        }
    }

    /// Publishes and waits for the broker's confirm.
    pub async fn publish(&self, msg: Outgoing<'_>) -> Result<(), PublishError> {
        self.start(msg).await?.wait().await
    }

    /// Sends the message and returns its pending confirm, so a caller can have many in flight
    /// and settle them afterwards (bulk submit).
    pub async fn start(&self, msg: Outgoing<'_>) -> Result<PendingConfirm, PublishError> {
        let line = self.live_line().await?;
        let confirm = line
            .channel
            .basic_publish(
                msg.exchange.into(),
                msg.routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                msg.body,
                msg.properties,
            )
            .await
            // (the action text is made only on an error: this runs for every message)
            .map_err(|e| BrokerError::amqp(format!("publish to {}", msg.routing_key))(e))?;
        Ok(PendingConfirm {
            confirm,
            exchange: msg.exchange.to_string(),
            routing_key: msg.routing_key.to_string(),
            line,
            patience: self.confirm_patience,
        })
    }
}

fn is_missing_exchange(err: &lapin::Error) -> bool {
    crate::error::server_reply(err)
        .is_some_and(|(_, text)| text.starts_with("NOT_FOUND - no exchange"))
}

/// A published message whose confirm has not been read yet.
pub struct PendingConfirm {
    confirm: PublisherConfirm,
    exchange: String,
    routing_key: String,
    line: Line,
    patience: Duration,
}

impl std::fmt::Debug for PendingConfirm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingConfirm")
            .field("routing_key", &self.routing_key)
            .finish_non_exhaustive()
    }
}

impl PendingConfirm {
    pub async fn wait(self) -> Result<(), PublishError> {
        let unconfirmed = PublishError::Unconfirmed {
            routing_key: self.routing_key.clone(),
            waited: self.patience,
        };
        let Ok(confirmed) = tokio::time::timeout(self.patience, self.confirm).await else {
            self.line.give_up().await;
            return Err(unconfirmed);
        };
        let outcome = match confirmed {
            Ok(outcome) => outcome,
            // Another publish gave the channel up and closed it under this one.
            Err(_) if self.line.given_up.load(Ordering::Acquire) => return Err(unconfirmed),
            // Publishing to a missing exchange closes the channel with 404 instead of returning
            // the message; for the caller it is the same mistake.
            Err(e) if is_missing_exchange(&e) => {
                return Err(PublishError::Unroutable {
                    exchange: self.exchange,
                    routing_key: self.routing_key,
                })
            }
            Err(e) => {
                return Err(BrokerError::amqp(format!("publish to {}", self.routing_key))(e).into())
            }
        };
        match outcome {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) => Err(PublishError::Unroutable {
                exchange: self.exchange,
                routing_key: self.routing_key,
            }),
            Confirmation::Nack(_) | Confirmation::NotRequested => Err(PublishError::Nacked {
                routing_key: self.routing_key,
            }),
        }
    }
}
