//! The `warren.toml` model. Validation happens while deserialising, so every error comes out of
//! the TOML parser with the line of the offending key; `docs/config.md` documents each field.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::members::ConnectOrder;
use crate::ids::validate_name;
use crate::priority::Priority;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub broker: BrokerConfig,
    #[serde(default, deserialize_with = "pipelines")]
    pub pipelines: Vec<PipelineConfig>,
    #[serde(default)]
    pub fairness: FairnessConfig,
    #[serde(default, deserialize_with = "super::schedule::schedules")]
    pub schedules: Vec<super::schedule::ScheduleConfig>,
    #[serde(default)]
    pub history: HistoryConfig,
    #[serde(default)]
    pub results: ResultsConfig,
}

/// Whether `[history] enabled` is on when the file does not say: measured against the cost
/// target (S1 and S2 with history on at least 0.85x of off; docs/bench.md).
pub const HISTORY_ENABLED_BY_DEFAULT: bool = false;

/// `[history]`: the job history stream `{ns}.history` (docs/ARCHITECTURE.md, "History").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryConfig {
    /// Whether workers and producers write lifecycle events, and `warren status` / `warren
    /// jobs` can read them.
    #[serde(default = "default_history_enabled")]
    pub enabled: bool,
    /// How long the stream keeps events (its `x-max-age`); whole segments go at a time.
    #[serde(default = "default_retention", deserialize_with = "retention")]
    pub retention: Duration,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            enabled: default_history_enabled(),
            retention: default_retention(),
        }
    }
}

impl HistoryConfig {
    /// The retention in the stream argument's syntax (`x-max-age`), in whole seconds.
    pub fn max_age(&self) -> String {
        format!("{}s", self.retention.as_secs())
    }
}

/// `[results]`: the check that every result event reached the results stream
/// (docs/ARCHITECTURE.md, "Results"). On RabbitMQ 3.10 a stream can lose events it confirmed
/// when its leader moves (rabbitmq-server#9457), which on one node never happens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResultsConfig {
    /// `auto` (the default: on when `[broker] urls` lists more than one member), `on` or `off`.
    #[serde(default)]
    pub check: ResultsCheck,
    /// How old a result event is before the check looks for it in the stream: longer than a
    /// publish takes to land, so what is merely late is not written twice.
    #[serde(default = "default_check_after", deserialize_with = "check_after")]
    pub check_after: Duration,
}

impl Default for ResultsConfig {
    fn default() -> Self {
        Self {
            check: ResultsCheck::default(),
            check_after: default_check_after(),
        }
    }
}

/// `[results] check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResultsCheck {
    #[default]
    Auto,
    On,
    Off,
}

impl Config {
    /// Whether result events also go to the check queue and workers check them: on a cluster
    /// (or when asked), since only a stream leader's move loses events.
    pub fn checks_results(&self) -> bool {
        match self.results.check {
            ResultsCheck::On => true,
            ResultsCheck::Off => false,
            ResultsCheck::Auto => self.broker.urls.len() > 1,
        }
    }
}

/// `[fairness]`: when a tenant counts as hot (flooding) and for how long. A hot tenant's jobs
/// take its pipeline's hot lanes instead of its shard, so the tenants that share the shard do
/// not wait behind the flood (docs/ARCHITECTURE.md, "Fairness").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FairnessConfig {
    /// A tenant that took at least this share of a lane's recent deliveries...
    #[serde(default = "default_hot_share", deserialize_with = "hot_share")]
    pub hot_share: f64,
    /// ...while the lane has at least this many ready messages, is hot. Also what a producer
    /// counts: this many jobs of one tenant in one bulk submit, or within `PRODUCER_WINDOW`.
    #[serde(default = "default_hot_depth", deserialize_with = "hot_depth")]
    pub hot_depth: u32,
    /// How long a hot mark lasts unless renewed: a flood that ends cools down by itself.
    #[serde(default = "default_hot_for", deserialize_with = "hot_for")]
    pub hot_for: Duration,
}

impl Default for FairnessConfig {
    fn default() -> Self {
        Self {
            hot_share: default_hot_share(),
            hot_depth: default_hot_depth(),
            hot_for: default_hot_for(),
        }
    }
}

/// `[broker]`: where RabbitMQ is and how names are scoped.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// The RabbitMQ nodes to connect to, each an AMQP URL (`amqp://` or `amqps://`): `url =
    /// "..."` for one broker, `urls = ["...", ...]` for the members of a cluster (either key,
    /// not both). A process connects to one member ([`Self::connect_order`]) and moves to the
    /// next when that one fails or goes away. Env `WARREN_AMQP_URL` (one URL, or several
    /// separated by commas) wins.
    #[serde(
        rename = "urls",
        alias = "url",
        default = "default_urls",
        deserialize_with = "super::members::amqp_urls"
    )]
    pub urls: Vec<String>,
    /// Which member of `urls` a process tries first: `random` (the default: processes spread
    /// over the cluster's nodes) or `listed` (in the order given).
    #[serde(default)]
    pub connect_order: ConnectOrder,
    /// Prefix of every exchange and queue name. Env `WARREN_NAMESPACE` wins.
    #[serde(default = "default_namespace", deserialize_with = "namespace")]
    pub namespace: String,
    /// Step queue type: `quorum` (replicated; the default) or `classic`.
    #[serde(default)]
    pub queue_type: QueueType,
    /// Largest step input (a job payload, or a step's output), in bytes of its MessagePack
    /// encoding. Producers refuse bigger payloads; workers fail a step whose output is bigger and
    /// set aside a step message whose input is.
    #[serde(default = "default_max_payload")]
    pub max_payload_bytes: usize,
    /// `[broker.tls]`: certificates for an `amqps://` URL.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// RabbitMQ's management API (`http://host:15672`), optional: the only place that counts
    /// messages delivered but not yet acked. Without it, queue depths are the ready messages
    /// alone. Credentials default to the AMQP URL's. Env `WARREN_MANAGEMENT_URL` wins.
    #[serde(default, deserialize_with = "management_url")]
    pub management_url: Option<String>,
    /// Longest one connection attempt may take: the TCP connect, then the TLS and AMQP
    /// handshake. Past it the attempt fails with an error instead of waiting forever on a broker
    /// that accepted the socket but never answers (one out of file handles, typically).
    #[serde(
        default = "default_connect_timeout",
        deserialize_with = "connect_timeout"
    )]
    pub connect_timeout: Duration,
}

// By hand, so the password in the URL never reaches a log line through `{:?}`.
impl std::fmt::Debug for BrokerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerConfig")
            .field(
                "urls",
                &self
                    .urls
                    .iter()
                    .map(|u| crate::telemetry::redact_url(u))
                    .collect::<Vec<_>>(),
            )
            .field("connect_order", &self.connect_order)
            .field("namespace", &self.namespace)
            .field("queue_type", &self.queue_type)
            .field("max_payload_bytes", &self.max_payload_bytes)
            .field("tls", &self.tls)
            .field(
                "management_url",
                &self
                    .management_url
                    .as_deref()
                    .map(crate::telemetry::redact_url),
            )
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// `[broker.tls]`: PEM files for TLS. Without a `ca_file`, the server's certificate must chain
/// to the system's trusted roots. Relative paths are relative to the config file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawTls")]
pub struct TlsConfig {
    /// Extra CA certificates to trust (PEM): for a broker with a private CA.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and its private key (PEM, PKCS#8 or PKCS#1), for brokers that ask
    /// for one (`ssl_options.verify = verify_peer`, `fail_if_no_peer_cert = true`).
    pub client: Option<ClientCert>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
}

impl TryFrom<RawTls> for TlsConfig {
    type Error = String;
    fn try_from(raw: RawTls) -> Result<Self, String> {
        let client = match (raw.cert_file, raw.key_file) {
            (Some(cert_file), Some(key_file)) => Some(ClientCert {
                cert_file,
                key_file,
            }),
            (None, None) => None,
            (Some(_), None) => return Err("`cert_file` needs `key_file` too".into()),
            (None, Some(_)) => return Err("`key_file` needs `cert_file` too".into()),
        };
        Ok(Self {
            ca_file: raw.ca_file,
            client,
        })
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            urls: default_urls(),
            connect_order: ConnectOrder::default(),
            namespace: default_namespace(),
            queue_type: QueueType::default(),
            max_payload_bytes: default_max_payload(),
            tls: None,
            management_url: None,
            connect_timeout: default_connect_timeout(),
        }
    }
}

impl BrokerConfig {
    /// The first member: where the credentials of every member are read from (the management
    /// API's, when its URL has none), and the broker of a one-URL config.
    pub fn url(&self) -> &str {
        self.urls.first().map_or("", String::as_str)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    #[default]
    Quorum,
    Classic,
}

impl QueueType {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        }
    }
}

/// `[[pipelines]]`: a named, ordered list of steps.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawPipeline")]
pub struct PipelineConfig {
    pub name: String,
    /// Queues per step and priority; tenants are spread over them by hash.
    pub shards: u16,
    /// Tenants with a dedicated shard.
    pub pins: BTreeMap<String, u16>,
    /// Most messages one step queue holds; publishing into a full one is refused (backpressure).
    pub max_queue_length: u32,
    /// The priorities its jobs may have, most urgent first: one set of step queues each.
    pub priorities: Vec<Priority>,
    /// Overflow lanes per step and priority that hot (flooding) tenants are moved to; 0 turns
    /// hot-tenant isolation off for the pipeline.
    pub hot_lanes: u16,
    pub steps: Vec<StepConfig>,
}

impl PipelineConfig {
    pub fn step(&self, name: &str) -> Option<&StepConfig> {
        self.steps.iter().find(|s| s.name == name)
    }

    /// The step after `name`, or `None` when `name` is the last one (or unknown).
    pub fn next_step(&self, name: &str) -> Option<&StepConfig> {
        let i = self.steps.iter().position(|s| s.name == name)?;
        self.steps.get(i + 1)
    }

    pub fn first_step(&self) -> &StepConfig {
        // A pipeline without steps is rejected while parsing.
        &self.steps[0]
    }

    pub fn shard_of(&self, tenant: &str) -> u16 {
        crate::shard::shard_for(tenant, self.shards, &self.pins)
    }

    /// Whether its jobs may have `priority` (it has queues for it).
    pub fn has_priority(&self, priority: Priority) -> bool {
        self.priorities.contains(&priority)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    #[serde(deserialize_with = "name")]
    name: String,
    #[serde(default = "default_shards", deserialize_with = "shards")]
    shards: u16,
    #[serde(default)]
    pins: BTreeMap<String, u16>,
    #[serde(
        default = "default_max_queue_length",
        deserialize_with = "max_queue_length"
    )]
    max_queue_length: u32,
    #[serde(default = "default_priorities", deserialize_with = "priorities")]
    priorities: Vec<Priority>,
    #[serde(default = "default_hot_lanes", deserialize_with = "hot_lanes")]
    hot_lanes: u16,
    #[serde(default)]
    steps: Vec<StepConfig>,
}

impl TryFrom<RawPipeline> for PipelineConfig {
    type Error = String;
    fn try_from(raw: RawPipeline) -> Result<Self, String> {
        let p = &raw.name;
        if raw.steps.is_empty() {
            return Err(format!(
                "pipeline `{p}` needs at least one [[pipelines.steps]]"
            ));
        }
        let mut seen = HashSet::new();
        for step in &raw.steps {
            if !seen.insert(step.name.as_str()) {
                return Err(format!(
                    "pipeline `{p}`: duplicate step name `{}`",
                    step.name
                ));
            }
        }
        if let Some(last) = raw.steps.last().filter(|s| s.fan_out.is_some()) {
            return Err(format!(
                "pipeline `{p}`: step `{}` has `fan_out` but no next step to join the parts",
                last.name
            ));
        }
        for (tenant, &shard) in &raw.pins {
            validate_name("tenant", tenant).map_err(|e| format!("pins: {e}"))?;
            if shard >= raw.shards {
                return Err(format!(
                    "pins.{tenant} = {shard}: shard must be below shards = {}",
                    raw.shards
                ));
            }
        }
        Ok(Self {
            name: raw.name,
            shards: raw.shards,
            pins: raw.pins,
            max_queue_length: raw.max_queue_length,
            priorities: raw.priorities,
            hot_lanes: raw.hot_lanes,
            steps: raw.steps,
        })
    }
}

/// `[[pipelines.steps]]`: one unit of work.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawStep")]
pub struct StepConfig {
    pub name: String,
    pub kind: StepKind,
    /// Longest one attempt may run.
    pub timeout: Duration,
    /// Tries before the job fails for good (1 = no retry).
    pub max_attempts: u32,
    /// Retry delays, the last one repeating.
    pub backoff: Vec<Duration>,
    /// Attempts of this step one worker process runs at once.
    pub concurrency: u32,
    /// Variables of the worker's environment a command step also gets (besides `PATH`, `HOME`,
    /// locale and the `WARREN_*` step variables). Never `WARREN_AMQP_URL`.
    pub pass_env: Vec<String>,
    /// Most attempts of this step running at once across every worker of the namespace.
    pub max_in_flight: Option<u32>,
    /// Most attempts of this step running at once for one tenant, across every worker.
    pub tenant_max_in_flight: Option<u32>,
    /// Its output is a list of parts, each a job of another pipeline; the next step (the join)
    /// runs once they have ended.
    pub fan_out: Option<FanOut>,
}

/// A fan-out step's `fan_out`, `max_parts_in_flight` and `on_part_failure`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FanOut {
    /// The pipeline each part is a job of.
    pub pipeline: String,
    /// Most parts of one fan-out running at once; `None`: no limit.
    pub max_parts_in_flight: Option<u32>,
    pub on_part_failure: OnPartFailure,
    /// Byte offset of `fan_out` in the file, so the check that its pipeline exists (made once
    /// every pipeline is known) can name the line.
    pub(crate) at: usize,
}

/// When the join of a fan-out runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnPartFailure {
    /// Once every part has ended, failed parts included.
    #[default]
    Continue,
    /// Once every part has succeeded: failed parts wait in the DLQ for a replay.
    Wait,
}

impl OnPartFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            OnPartFailure::Continue => "continue",
            OnPartFailure::Wait => "wait",
        }
    }
}

/// What runs a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepKind {
    /// A program: JSON on stdin, JSON on stdout (DESIGN.md contract 2).
    Command(Vec<String>),
    /// A Rust handler registered on the worker under this name.
    Handler(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    #[serde(deserialize_with = "name")]
    name: String,
    command: Option<Vec<String>>,
    #[serde(default, deserialize_with = "opt_name")]
    handler: Option<String>,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    timeout: Duration,
    #[serde(default = "default_max_attempts", deserialize_with = "max_attempts")]
    max_attempts: u32,
    #[serde(default = "default_backoff", deserialize_with = "durations")]
    backoff: Vec<Duration>,
    #[serde(default = "default_concurrency", deserialize_with = "concurrency")]
    concurrency: u32,
    #[serde(default)]
    pass_env: Vec<String>,
    #[serde(default, deserialize_with = "max_in_flight")]
    max_in_flight: Option<u32>,
    #[serde(default, deserialize_with = "tenant_max_in_flight")]
    tenant_max_in_flight: Option<u32>,
    #[serde(default)]
    fan_out: Option<toml::Spanned<String>>,
    #[serde(default, deserialize_with = "max_parts_in_flight")]
    max_parts_in_flight: Option<u32>,
    #[serde(default)]
    on_part_failure: Option<OnPartFailure>,
}

impl TryFrom<RawStep> for StepConfig {
    type Error = String;
    fn try_from(raw: RawStep) -> Result<Self, String> {
        let s = &raw.name;
        let kind = match (raw.command, raw.handler) {
            (Some(cmd), None) if cmd.is_empty() || cmd[0].is_empty() => {
                return Err(format!("step `{s}`: `command` needs at least a program"))
            }
            (Some(cmd), None) => StepKind::Command(cmd),
            (None, Some(h)) => StepKind::Handler(h),
            (Some(_), Some(_)) => {
                return Err(format!(
                    "step `{s}`: set either `command` or `handler`, not both"
                ))
            }
            (None, None) => return Err(format!("step `{s}`: set `command` or `handler`")),
        };
        if raw.timeout.is_zero() {
            return Err(format!("step `{s}`: `timeout` must be more than zero"));
        }
        if raw.backoff.is_empty() {
            return Err(format!("step `{s}`: `backoff` needs at least one delay"));
        }
        if !raw.pass_env.is_empty() && matches!(kind, StepKind::Handler(_)) {
            return Err(format!(
                "step `{s}`: `pass_env` is for command steps; a handler reads the worker's environment"
            ));
        }
        for var in &raw.pass_env {
            check_pass_env(var).map_err(|e| format!("step `{s}`: `pass_env`: {e}"))?;
        }
        let fan_out = match raw.fan_out {
            Some(spanned) => {
                let at = spanned.span().start;
                let pipeline = spanned.into_inner();
                validate_name("fan_out", &pipeline)
                    .map_err(|e| format!("step `{s}`: `fan_out`: {e}"))?;
                Some(FanOut {
                    pipeline,
                    max_parts_in_flight: raw.max_parts_in_flight,
                    on_part_failure: raw.on_part_failure.unwrap_or_default(),
                    at,
                })
            }
            None if raw.max_parts_in_flight.is_some() => {
                return Err(format!(
                    "step `{s}`: `max_parts_in_flight` is for a step with `fan_out`"
                ))
            }
            None if raw.on_part_failure.is_some() => {
                return Err(format!(
                    "step `{s}`: `on_part_failure` is for a step with `fan_out`"
                ))
            }
            None => None,
        };
        Ok(Self {
            name: raw.name,
            kind,
            timeout: raw.timeout,
            max_attempts: raw.max_attempts,
            backoff: raw.backoff,
            concurrency: raw.concurrency,
            pass_env: raw.pass_env,
            max_in_flight: raw.max_in_flight,
            tenant_max_in_flight: raw.tenant_max_in_flight,
            fan_out,
        })
    }
}

/// A variable name a command step may be given: a plain name, and never the broker URL.
fn check_pass_env(var: &str) -> Result<(), String> {
    let plain = var
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !plain {
        return Err(format!("{var:?} is not a variable name"));
    }
    if var == crate::env::ENV_WARREN_AMQP_URL {
        return Err(format!(
            "{var} holds the broker credentials and is never passed to steps"
        ));
    }
    Ok(())
}

// === defaults ===

fn default_urls() -> Vec<String> {
    vec!["amqp://guest:guest@127.0.0.1:5672/%2f".to_string()]
}
fn default_namespace() -> String {
    "warren".to_string()
}
fn default_max_payload() -> usize {
    1024 * 1024
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_shards() -> u16 {
    4
}
fn default_priorities() -> Vec<Priority> {
    Priority::ALL.to_vec()
}
fn default_hot_lanes() -> u16 {
    2
}
fn default_hot_share() -> f64 {
    0.1
}
fn default_hot_depth() -> u32 {
    500
}
fn default_history_enabled() -> bool {
    HISTORY_ENABLED_BY_DEFAULT
}
fn default_retention() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn default_hot_for() -> Duration {
    Duration::from_secs(60)
}
fn default_max_queue_length() -> u32 {
    100_000
}
fn default_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_attempts() -> u32 {
    5
}
fn default_backoff() -> Vec<Duration> {
    vec![
        Duration::from_secs(1),
        Duration::from_secs(10),
        Duration::from_secs(60),
    ]
}
fn default_concurrency() -> u32 {
    4
}

// === field validators: each error names its key; the parser adds the line ===

/// Largest cap: each unit is a token message on the broker.
const MAX_CAP: u64 = 10_000;

fn durations<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
    Vec::<humantime_serde::Serde<Duration>>::deserialize(d)
        .map(|list| list.into_iter().map(|s| s.into_inner()).collect())
}

fn pipelines<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PipelineConfig>, D::Error> {
    let list = Vec::<PipelineConfig>::deserialize(d)?;
    let mut seen = HashSet::new();
    for p in &list {
        if !seen.insert(p.name.as_str()) {
            return Err(serde::de::Error::custom(format!(
                "pipelines: duplicate pipeline name `{}`",
                p.name
            )));
        }
    }
    Ok(list)
}

fn name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let value = String::deserialize(d)?;
    validate_name("name", &value).map_err(serde::de::Error::custom)?;
    Ok(value)
}

fn opt_name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let value = String::deserialize(d)?;
    validate_name("handler", &value).map_err(serde::de::Error::custom)?;
    Ok(Some(value))
}

fn namespace<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let value = String::deserialize(d)?;
    validate_name("namespace", &value).map_err(serde::de::Error::custom)?;
    Ok(value)
}

fn management_url<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let value = String::deserialize(d)?;
    check_management_url(&value).map_err(serde::de::Error::custom)?;
    Ok(Some(value))
}

pub(crate) fn check_management_url(url: &str) -> Result<(), String> {
    if url.starts_with("http://") || url.starts_with("https://") {
        Ok(())
    } else {
        Err(format!(
            "management_url {:?} must start with http:// or https://",
            crate::telemetry::redact_url(url)
        ))
    }
}

fn connect_timeout<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let value = humantime_serde::deserialize(d)?;
    if value == Duration::ZERO {
        return Err(serde::de::Error::custom(
            "`connect_timeout` must be more than zero",
        ));
    }
    Ok(value)
}

fn ranged<'de, D: Deserializer<'de>>(d: D, key: &str, min: u64, max: u64) -> Result<u64, D::Error> {
    let value = i64::deserialize(d)?;
    if value < min as i64 || value > max as i64 {
        return Err(serde::de::Error::custom(format!(
            "`{key}` must be between {min} and {max}, got {value}"
        )));
    }
    Ok(value as u64)
}

fn shards<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    ranged(d, "shards", 1, 1024).map(|v| v as u16)
}

/// At least one, none twice; kept most urgent first, whatever order the file lists them in.
fn priorities<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Priority>, D::Error> {
    let mut list = Vec::<Priority>::deserialize(d)?;
    if list.is_empty() {
        return Err(serde::de::Error::custom(
            "`priorities` needs at least one of high, normal, low",
        ));
    }
    list.sort();
    if let Some(twice) = list.windows(2).find(|w| w[0] == w[1]) {
        return Err(serde::de::Error::custom(format!(
            "`priorities` lists {} twice",
            twice[0]
        )));
    }
    Ok(list)
}

fn hot_lanes<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    ranged(d, "hot_lanes", 0, 64).map(|v| v as u16)
}

fn hot_share<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let value = f64::deserialize(d)?;
    if !(value > 0.0 && value <= 1.0) {
        return Err(serde::de::Error::custom(format!(
            "`hot_share` must be more than 0 and at most 1, got {value}"
        )));
    }
    Ok(value)
}

fn hot_depth<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    ranged(d, "hot_depth", 1, 100_000_000).map(|v| v as u32)
}

fn retention<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let value: Duration = humantime_serde::deserialize(d)?;
    if value < Duration::from_secs(60) || value > Duration::from_secs(3650 * 24 * 3600) {
        return Err(serde::de::Error::custom(format!(
            "`retention` must be between 1m and 3650d, not {}",
            humantime::format_duration(value)
        )));
    }
    Ok(value)
}

fn default_check_after() -> Duration {
    Duration::from_secs(15)
}

fn check_after<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let value: Duration = humantime_serde::deserialize(d)?;
    if value < Duration::from_secs(1) || value > Duration::from_secs(1800) {
        return Err(serde::de::Error::custom(format!(
            "`check_after` must be between 1s and 30m, not {}",
            humantime::format_duration(value)
        )));
    }
    Ok(value)
}

fn hot_for<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let value: Duration = humantime_serde::deserialize(d)?;
    if value < Duration::from_secs(1) {
        return Err(serde::de::Error::custom("`hot_for` must be at least 1s"));
    }
    Ok(value)
}

fn max_queue_length<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    ranged(d, "max_queue_length", 1, 100_000_000).map(|v| v as u32)
}

fn max_attempts<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    ranged(d, "max_attempts", 1, 1000).map(|v| v as u32)
}

fn concurrency<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    ranged(d, "concurrency", 1, 10_000).map(|v| v as u32)
}

/// The cluster-wide caps: one token each, held while an attempt runs.
fn max_in_flight<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    ranged(d, "max_in_flight", 1, MAX_CAP).map(|v| Some(v as u32))
}

fn max_parts_in_flight<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    ranged(d, "max_parts_in_flight", 1, 1_000_000).map(|v| Some(v as u32))
}

fn tenant_max_in_flight<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    ranged(d, "tenant_max_in_flight", 1, MAX_CAP).map(|v| Some(v as u32))
}
