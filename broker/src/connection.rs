//! Pooled AMQP connections (deadpool), over TLS when the URL is `amqps://`, each opened within
//! `[broker] connect_timeout` (see `dial`). A [`Broker`] is cheap to clone; every clone shares
//! the pool.

use std::time::Duration;

use deadpool::managed::{self, Metrics, Pool, PoolError, RecycleError, RecycleResult};
use deadpool::Runtime;
use lapin::options::ConfirmSelectOptions;
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::{Channel, Connection};
use warren_common::config::{BrokerConfig, TlsConfig};
use warren_common::telemetry::redact_url;

use crate::dial::{dial, DialError};
use crate::error::BrokerError;
use crate::names::Names;

/// How long closing a connection waits for the broker's answer.
pub const CLOSE_PATIENCE: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct Broker {
    pool: Pool<Manager>,
    names: Names,
    url: String,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("url", &redact_url(&self.url))
            .field("namespace", &self.names.namespace())
            .finish()
    }
}

/// Opens connections for the pool, with the TLS settings and the deadline of the config.
struct Manager {
    url: String,
    tls: OwnedTLSConfig,
    patience: Duration,
}

impl managed::Manager for Manager {
    type Type = Connection;
    type Error = BrokerError;

    async fn create(&self) -> Result<Connection, BrokerError> {
        let url = redact_url(&self.url);
        dial(&self.url, &self.tls, self.patience)
            .await
            .map_err(|e| match e {
                DialError::TimedOut(stage) => BrokerError::ConnectTimeout {
                    url,
                    stage,
                    waited: self.patience,
                },
                // lapin's message never includes the URL.
                DialError::Failed(e) => BrokerError::Connect {
                    url,
                    reason: e.to_string(),
                },
            })
    }

    async fn recycle(&self, conn: &mut Connection, _: &Metrics) -> RecycleResult<BrokerError> {
        if conn.status().connected() {
            Ok(())
        } else {
            Err(RecycleError::message("connection closed"))
        }
    }
}

/// Reads the PEM files `[broker.tls]` names. A missing or unreadable file is an error that
/// names its key.
fn load_tls(tls: Option<&TlsConfig>, url: &str) -> Result<OwnedTLSConfig, String> {
    let Some(tls) = tls else {
        return Ok(OwnedTLSConfig::default());
    };
    if !url.starts_with("amqps://") {
        return Err("[broker.tls] is set, but the url is not amqps://".into());
    }
    let read = |key: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| format!("broker.tls.{key} {}: {e}", path.display()))
    };
    let cert_chain = match &tls.ca_file {
        Some(path) => Some(
            String::from_utf8(read("ca_file", path)?)
                .map_err(|_| format!("broker.tls.ca_file {}: not PEM text", path.display()))?,
        ),
        None => None,
    };
    let identity = match &tls.client {
        Some(client) => Some(OwnedIdentity::PKCS8 {
            pem: read("cert_file", &client.cert_file)?,
            key: read("key_file", &client.key_file)?,
        }),
        None => None,
    };
    Ok(OwnedTLSConfig {
        identity,
        cert_chain,
    })
}

impl Broker {
    /// Builds the pool and opens one connection, so a wrong URL fails here, not later.
    pub async fn connect(config: &BrokerConfig) -> Result<Self, BrokerError> {
        let url = config.url.clone();
        let connect_error = |reason: String| BrokerError::Connect {
            url: redact_url(&url),
            reason,
        };
        let tls = load_tls(config.tls.as_ref(), &url).map_err(connect_error)?;
        let manager = Manager {
            url: url.clone(),
            tls,
            patience: config.connect_timeout,
        };
        let pool = Pool::builder(manager)
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| connect_error(e.to_string()))?;
        let broker = Self {
            pool,
            names: Names::new(&config.namespace),
            url,
        };
        broker.channel().await?;
        Ok(broker)
    }

    pub fn names(&self) -> &Names {
        &self.names
    }

    /// The URL with its password hidden, for logs.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    /// A fresh channel on a pooled connection.
    pub async fn channel(&self) -> Result<Channel, BrokerError> {
        let conn = self.pool.get().await.map_err(|e| match e {
            PoolError::Backend(e) => e,
            other => BrokerError::Connect {
                url: redact_url(&self.url),
                reason: other.to_string(),
            },
        })?;
        conn.create_channel()
            .await
            .map_err(BrokerError::amqp("open channel"))
    }

    /// A fresh channel in publisher-confirm mode.
    pub async fn confirm_channel(&self) -> Result<Channel, BrokerError> {
        let channel = self.channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(BrokerError::amqp("enable publisher confirms"))?;
        Ok(channel)
    }

    /// Closes the pooled connections with a proper AMQP close (the broker otherwise logs each
    /// as "client unexpectedly closed"). Unacked deliveries on them return to their queues.
    /// Takes at most [`CLOSE_PATIENCE`] per connection, since a dead one may never answer.
    pub async fn close(&self) {
        // Only the idle ones, and never through `get()`, which would open a fresh connection
        // to replace a broken one.
        let idle = self.pool.retain(|_, _| false).removed;
        self.pool.close();
        for conn in idle.into_iter().filter(|c| c.status().connected()) {
            let _ = tokio::time::timeout(CLOSE_PATIENCE, conn.close(200, "bye".into())).await;
        }
    }
}

/// One channel for a series of calls, opened on first use and opened again when the broker has
/// closed it: a failed declare (a missing queue, a conflict) closes the channel it was made on.
#[derive(Debug)]
pub(crate) struct ReopenedChannel<'a> {
    broker: &'a Broker,
    channel: Option<Channel>,
}

impl<'a> ReopenedChannel<'a> {
    pub(crate) fn new(broker: &'a Broker) -> Self {
        Self {
            broker,
            channel: None,
        }
    }

    /// The channel, open.
    pub(crate) async fn get(&mut self) -> Result<&Channel, BrokerError> {
        if !self
            .channel
            .as_ref()
            .is_some_and(|c| c.status().connected())
        {
            self.channel = Some(self.broker.channel().await?);
        }
        Ok(self.channel.as_ref().expect("opened above"))
    }

    pub(crate) async fn close(self) {
        if let Some(channel) = self.channel {
            let _ = channel.close(200, "done".into()).await;
        }
    }
}
