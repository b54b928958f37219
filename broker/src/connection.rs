//! Pooled AMQP connections (deadpool-lapin). A [`Broker`] is cheap to clone; every clone shares
//! the pool.

use deadpool_lapin::{Config as PoolConfig, Pool, Runtime};
use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, ConnectionProperties};
use warren_common::config::BrokerConfig;
use warren_common::telemetry::redact_url;

use crate::error::BrokerError;
use crate::names::Names;

#[derive(Clone)]
pub struct Broker {
    pool: Pool,
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

impl Broker {
    /// Builds the pool and opens one connection, so a wrong URL fails here, not later.
    pub async fn connect(config: &BrokerConfig) -> Result<Self, BrokerError> {
        let url = config.url.clone();
        let connect_error = |reason: String| BrokerError::Connect {
            url: redact_url(&url),
            reason,
        };
        let pool_config = PoolConfig {
            url: Some(url.clone()),
            ..PoolConfig::default()
        };
        let pool = pool_config
            .create_pool(
                || ConnectionProperties::default().with_connection_name("warren".into()),
                Runtime::Tokio1,
            )
            .map_err(|e| connect_error(e.to_string()))?;
        let broker = Self {
            pool,
            names: Names::new(&config.namespace),
            url: url.clone(),
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
        let conn = self.pool.get().await.map_err(|e| BrokerError::Connect {
            url: redact_url(&self.url),
            // deadpool's message wraps lapin's, which never includes the URL.
            reason: e.to_string(),
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
    pub async fn close(&self) {
        // Only idle connections: a get() when none is idle would open a new one.
        while self.pool.status().available > 0 {
            let Ok(conn) = self.pool.get().await else {
                break;
            };
            let conn = deadpool_lapin::Object::take(conn);
            let _ = conn.close(200, "bye".into()).await;
        }
        self.pool.close();
    }
}
