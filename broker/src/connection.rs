//! Pooled AMQP connections (deadpool), over TLS when the URL is `amqps://`, each opened within
//! `[broker] connect_timeout` (see `dial`), to one member of `[broker] urls` (see `members`). A
//! [`Broker`] is cheap to clone; every clone shares the pool.

use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use deadpool::managed::{self, Metrics, Pool, PoolError, RecycleError, RecycleResult};
use deadpool::Runtime;
use lapin::options::ConfirmSelectOptions;
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::{Channel, Connection};
use tracing::{info, warn};
use warren_common::config::{BrokerConfig, TlsConfig};
use warren_common::telemetry::redact_url;

use crate::dial::{dial, DialError};
use crate::error::BrokerError;
use crate::members::Members;
use crate::names::Names;

/// How long closing a connection waits for the broker's answer.
pub const CLOSE_PATIENCE: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct Broker {
    pool: Pool<Manager>,
    names: Names,
    members: Arc<Members>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("url", &self.redacted_url())
            .field("namespace", &self.names.namespace())
            .finish()
    }
}

/// A pooled connection, and which member it goes to (so its loss moves the next dial on).
#[derive(Debug)]
pub(crate) struct MemberConnection {
    connection: Connection,
    member: usize,
}

impl Deref for MemberConnection {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.connection
    }
}

/// Opens connections for the pool, with the TLS settings and the deadline of the config.
struct Manager {
    members: Arc<Members>,
    /// The connections' name: "warren <namespace>", so an operator (or a test) can tell a
    /// namespace's connections apart in the broker's list.
    name: String,
    tls: OwnedTLSConfig,
    patience: Duration,
}

impl Manager {
    async fn dial_member(&self, member: usize) -> Result<Connection, BrokerError> {
        let url = redact_url(self.members.url(member));
        dial(
            self.members.url(member),
            &self.name,
            &self.tls,
            self.patience,
        )
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
}

impl managed::Manager for Manager {
    type Type = MemberConnection;
    type Error = BrokerError;

    /// Tries each member once, the preferred one first. With one URL this is one dial and its
    /// error as it was; with several, the error lists what each member said.
    async fn create(&self) -> Result<MemberConnection, BrokerError> {
        let mut failures = Vec::new();
        for member in self.members.order() {
            match self.dial_member(member).await {
                Ok(connection) => {
                    if !failures.is_empty() {
                        info!(member = %redact_url(self.members.url(member)),
                            "Connected to another member of the cluster.");
                    }
                    self.members.connected(member);
                    return Ok(MemberConnection { connection, member });
                }
                Err(e) if self.members.len() == 1 => return Err(e),
                Err(e) => {
                    warn!(error = %e, "A member of the cluster is out of reach; trying the next.");
                    failures.push(e.to_string());
                }
            }
        }
        Err(BrokerError::Connect {
            url: format!("any of the {} members in [broker] urls", self.members.len()),
            reason: failures.join("; "),
        })
    }

    async fn recycle(
        &self,
        conn: &mut MemberConnection,
        _: &Metrics,
    ) -> RecycleResult<BrokerError> {
        if conn.status().connected() {
            Ok(())
        } else {
            self.members.lost(conn.member);
            Err(RecycleError::message("connection closed"))
        }
    }
}

/// Reads the PEM files `[broker.tls]` names. A missing or unreadable file is an error that
/// names its key.
fn load_tls(tls: Option<&TlsConfig>, urls: &[String]) -> Result<OwnedTLSConfig, String> {
    let Some(tls) = tls else {
        return Ok(OwnedTLSConfig::default());
    };
    if let Some(plain) = urls.iter().find(|u| !u.starts_with("amqps://")) {
        return Err(format!(
            "[broker.tls] is set, but the url {} is not amqps://",
            redact_url(plain)
        ));
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

/// The name a namespace's connections carry in the broker's connection list.
pub fn connection_name(namespace: &str) -> String {
    format!("warren {namespace}")
}

impl Broker {
    /// Builds the pool and opens one connection, so a wrong URL fails here, not later.
    pub async fn connect(config: &BrokerConfig) -> Result<Self, BrokerError> {
        let members = Members::shared(config);
        let connect_error = |reason: String| BrokerError::Connect {
            url: redact_url(config.url()),
            reason,
        };
        let tls = load_tls(config.tls.as_ref(), &config.urls).map_err(connect_error)?;
        let manager = Manager {
            members: Arc::clone(&members),
            name: connection_name(&config.namespace),
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
            members,
        };
        broker.channel().await?;
        Ok(broker)
    }

    pub fn names(&self) -> &Names {
        &self.names
    }

    /// The URL of the member connected to (or tried first next), its password hidden, for logs.
    pub fn redacted_url(&self) -> String {
        redact_url(self.members.current())
    }

    /// A fresh channel on a pooled connection.
    pub async fn channel(&self) -> Result<Channel, BrokerError> {
        let conn = self.pool.get().await.map_err(|e| match e {
            PoolError::Backend(e) => e,
            other => BrokerError::Connect {
                url: self.redacted_url(),
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
