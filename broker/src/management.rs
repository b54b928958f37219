//! RabbitMQ's management API, for the figures AMQP cannot give: messages delivered to a
//! consumer but not yet acked (a worker's prefetch and the steps it is running), each node's
//! open-files limit and use ([`Management::file_descriptors`]), and every queue of the broker
//! with its type and nodes ([`Management::queues`]).
//!
//! Optional (`[broker] management_url`); it needs the `rabbitmq_management` plugin. The
//! broker refreshes these counts every few seconds (`collect_statistics_interval`, 5 s by
//! default), so they lag the passive-declare figures by up to that much.

use std::collections::HashMap;
use std::time::Duration;

use lapin::uri::AMQPUri;
use serde::Deserialize;
use warren_common::backoff::Backoff;
use warren_common::config::BrokerConfig;
use warren_common::telemetry::redact_url;

use crate::error::BrokerError;

/// How long one request may take; the supervisor reads every interval and must not hang.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Requests made for one answer while the broker answers with a server error.
const SERVER_ERROR_TRIES: u32 = 3;

/// A client of the management API of the broker a config names.
#[derive(Clone)]
pub struct Management {
    http: reqwest::Client,
    /// `<management_url>/api/queues/<vhost>`
    queues_url: String,
    /// `<management_url>/api/nodes`
    nodes_url: String,
    /// `<management_url>/api/queues`: every vhost's.
    all_queues_url: String,
    vhost: String,
    user: String,
    password: String,
}

impl std::fmt::Debug for Management {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Management")
            .field("queues_url", &self.queues_url)
            .field("nodes_url", &self.nodes_url)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// One node's open-files figures, as `/api/nodes` reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFiles {
    /// `rabbit@host`
    pub node: String,
    /// The node's open-files limit (`fd_total`): the `nofile` ulimit it runs with.
    pub total: u64,
    /// Open files (`fd_used`): on RabbitMQ 3.10 the process's open files, which leaves out
    /// the handles quorum queues take from its file-handle cache (see `capacity`).
    pub used: u64,
}

/// One queue of the broker, any vhost.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct QueueInfo {
    pub vhost: String,
    pub name: String,
    /// `quorum`, `classic` or `stream`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The nodes with a replica (quorum queues and streams); empty for a classic queue.
    #[serde(default)]
    pub members: Vec<String>,
}

#[derive(Deserialize)]
struct NodeStats {
    name: String,
    /// Absent on a node that is down, or on a version that does not report them.
    fd_total: Option<u64>,
    fd_used: Option<u64>,
}

#[derive(Deserialize)]
struct QueueStats {
    name: String,
    /// Absent on a queue the broker has not collected stats for yet.
    #[serde(default)]
    messages_unacknowledged: u64,
}

impl Management {
    /// `None` when the config has no `management_url`. The vhost, and the credentials unless
    /// the management URL carries its own, come from the AMQP URL.
    pub fn from_config(config: &BrokerConfig) -> Result<Option<Self>, BrokerError> {
        let Some(base) = &config.management_url else {
            return Ok(None);
        };
        let invalid = |reason: String| BrokerError::Management {
            url: redact_url(base),
            reason,
        };
        let amqp: AMQPUri = config
            .url()
            .parse()
            .map_err(|e| invalid(format!("cannot read the AMQP url: {e}")))?;
        let mut url = reqwest::Url::parse(base).map_err(|e| invalid(e.to_string()))?;
        let (mut user, mut password) = (
            amqp.authority.userinfo.username.clone(),
            amqp.authority.userinfo.password.clone(),
        );
        if !url.username().is_empty() {
            user = percent_decode(url.username());
            password = percent_decode(url.password().unwrap_or(""));
            let _ = url.set_username("");
            let _ = url.set_password(None);
        }
        url.path_segments_mut()
            .map_err(|()| invalid("not a base URL".into()))?
            .pop_if_empty()
            .push("api");
        let api = |segments: &[&str]| {
            let mut url = url.clone();
            url.path_segments_mut()
                .expect("checked above: a base URL")
                .extend(segments);
            url.to_string()
        };
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| invalid(e.to_string()))?;
        Ok(Some(Self {
            http,
            queues_url: api(&["queues", &amqp.vhost]),
            nodes_url: api(&["nodes"]),
            all_queues_url: api(&["queues"]),
            vhost: amqp.vhost,
            user,
            password,
        }))
    }

    /// Unacked messages of every queue of the vhost whose name starts with `prefix`.
    pub async fn unacked(&self, prefix: &str) -> Result<HashMap<String, u64>, BrokerError> {
        let queues: Vec<QueueStats> = self
            .get_json(&self.queues_url, "name,messages_unacknowledged")
            .await?;
        Ok(queues
            .into_iter()
            .filter(|q| q.name.starts_with(prefix))
            .map(|q| (q.name, q.messages_unacknowledged))
            .collect())
    }

    /// The vhost of the AMQP URL, where the namespace's queues live.
    pub fn vhost(&self) -> &str {
        &self.vhost
    }

    /// Every queue of every vhost, with its type and the nodes that host it.
    pub async fn queues(&self) -> Result<Vec<QueueInfo>, BrokerError> {
        self.get_json(&self.all_queues_url, "vhost,name,type,members")
            .await
    }

    /// The open-files limit and use of every running node of the cluster.
    pub async fn file_descriptors(&self) -> Result<Vec<NodeFiles>, BrokerError> {
        let nodes: Vec<NodeStats> = self
            .get_json(&self.nodes_url, "name,fd_total,fd_used")
            .await?;
        Ok(nodes
            .into_iter()
            .filter_map(|n| {
                Some(NodeFiles {
                    total: n.fd_total?,
                    used: n.fd_used?,
                    node: n.name,
                })
            })
            .collect())
    }

    /// GET `url` (only `columns`), authenticated, and its JSON answer. A server error is asked
    /// again, up to [`SERVER_ERROR_TRIES`] times in all: RabbitMQ 3.10 answers a queue listing
    /// with HTTP 500 when it catches a classic queue half declared or deleted by another client
    /// (`node(none)` in `rabbit_amqqueue_process:format`), which the next listing does not.
    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
        columns: &str,
    ) -> Result<T, BrokerError> {
        let failed = |reason: String| BrokerError::Management {
            url: url.to_string(),
            reason,
        };
        let mut backoff = Backoff::try_new(Duration::from_millis(100), Duration::from_secs(1))
            .expect("valid bounds");
        let response = loop {
            let response = self
                .http
                .get(url)
                .query(&[("columns", columns)])
                .basic_auth(&self.user, Some(&self.password))
                .send()
                .await
                .map_err(|e| failed(error_chain(&e)))?;
            if !response.status().is_server_error() || backoff.tries() + 1 >= SERVER_ERROR_TRIES {
                break response;
            }
            tokio::time::sleep(backoff.next_delay()).await;
        };
        let status = response.status();
        if !status.is_success() {
            let hint = match status.as_u16() {
                401 => " (wrong user or password)",
                403 => " (the user needs the `monitoring` tag)",
                404 => " (no such vhost)",
                _ => "",
            };
            return Err(failed(format!("HTTP {status}{hint}")));
        }
        response
            .json()
            .await
            .map_err(|e| failed(format!("unexpected answer: {e}")))
    }
}

/// reqwest's top-level message is terse ("error sending request"); the cause says why.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    text
}

/// The URL keeps its userinfo percent-encoded; basic auth wants it as typed.
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    use axum::http::StatusCode;
    use axum::routing::get;

    use super::*;

    /// A management API whose queue listing fails `failures` times with HTTP 500, then lists
    /// one queue; returns its client and the count of listings asked.
    async fn flaky_api(failures: u32) -> (Management, Arc<AtomicU32>) {
        let asked = Arc::new(AtomicU32::new(0));
        let counter = asked.clone();
        let app = axum::Router::new().route(
            "/api/queues/{vhost}",
            get(move || {
                let n = counter.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n < failures {
                        (StatusCode::INTERNAL_SERVER_ERROR, String::new())
                    } else {
                        let body = r#"[{"name":"ns.q","messages_unacknowledged":7}]"#;
                        (StatusCode::OK, body.to_string())
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let config = BrokerConfig {
            management_url: Some(format!("http://127.0.0.1:{port}")),
            ..BrokerConfig::default()
        };
        let api = Management::from_config(&config)
            .unwrap()
            .expect("configured");
        (api, asked)
    }

    #[tokio::test]
    async fn a_passing_server_error_is_asked_again() {
        let (api, asked) = flaky_api(SERVER_ERROR_TRIES - 1).await;
        let unacked = api.unacked("ns.").await.unwrap();
        assert_eq!(unacked.get("ns.q"), Some(&7));
        assert_eq!(asked.load(Ordering::SeqCst), SERVER_ERROR_TRIES);
    }

    #[tokio::test]
    async fn a_lasting_server_error_is_reported_after_the_last_try() {
        let (api, asked) = flaky_api(u32::MAX).await;
        let error = api.unacked("ns.").await.unwrap_err().to_string();
        assert!(error.contains("HTTP 500"), "{error}");
        assert_eq!(asked.load(Ordering::SeqCst), SERVER_ERROR_TRIES);
    }
}
