//! Loading `warren.toml`: parse (with line-numbered errors), apply env overrides, resolve
//! relative command paths against the file's folder.

mod members;
mod model;
mod schedule;

use std::path::{Path, PathBuf};

pub use members::ConnectOrder;
pub use model::{
    BrokerConfig, ClientCert, Config, FanOut, HistoryConfig, OnPartFailure, PipelineConfig,
    QueueType, ResultsCheck, ResultsConfig, StepConfig, StepKind, TlsConfig,
    HISTORY_ENABLED_BY_DEFAULT,
};
pub use schedule::{Overlap, ScheduleConfig, DEFAULT_SCHEDULE_TENANT};

use crate::env::{
    Env, ENV_WARREN_AMQP_URL, ENV_WARREN_CONFIG, ENV_WARREN_MANAGEMENT_URL, ENV_WARREN_NAMESPACE,
};
use crate::ids::validate_name;

/// Default config path, relative to the working directory.
pub const DEFAULT_CONFIG_PATH: &str = "warren.toml";

/// A config that could not be loaded. The message names the file, the line when the TOML parser
/// knows it, and the key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Invalid {
        origin: String,
        line: Option<usize>,
        message: String,
    },
    #[error("environment variable {key}: {message}")]
    Env { key: &'static str, message: String },
}

impl Config {
    /// Loads `path`, or `$WARREN_CONFIG`, or `./warren.toml`.
    pub fn load(path: Option<&Path>, env: &dyn Env) -> Result<Self, ConfigError> {
        let path = match path {
            Some(p) => p.to_path_buf(),
            None => env
                .var(ENV_WARREN_CONFIG)
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH)),
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("."));
        Self::parse(&text, &path.display().to_string(), &base, env)
    }

    /// Parses TOML `text`; `origin` names it in errors; relative command paths resolve
    /// against `base_dir`.
    pub fn parse(
        text: &str,
        origin: &str,
        base_dir: &Path,
        env: &dyn Env,
    ) -> Result<Self, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Invalid {
            origin: origin.to_string(),
            line: e.span().map(|span| line_of(text, span.start)),
            message: explain(e.message().trim()),
        })?;
        config
            .check_fan_outs()
            .map_err(|(at, message)| ConfigError::Invalid {
                origin: origin.to_string(),
                line: Some(line_of(text, at)),
                message,
            })?;
        schedule::check_pipelines(&config.schedules, |p| config.pipeline(p).is_some()).map_err(
            |(at, message)| ConfigError::Invalid {
                origin: origin.to_string(),
                line: Some(line_of(text, at)),
                message,
            },
        )?;
        config.apply_env(env)?;
        config.resolve_paths(base_dir);
        Ok(config)
    }

    /// Each `fan_out` names a pipeline of the file: checked once all are known.
    fn check_fan_outs(&self) -> Result<(), (usize, String)> {
        for (pipeline, step) in self
            .pipelines
            .iter()
            .flat_map(|p| p.steps.iter().map(move |s| (p, s)))
        {
            let Some(fan_out) = &step.fan_out else {
                continue;
            };
            if self.pipeline(&fan_out.pipeline).is_none() {
                return Err((
                    fan_out.at,
                    format!(
                        "step `{}` of pipeline `{}`: `fan_out` names no pipeline of this file: `{}`",
                        step.name, pipeline.name, fan_out.pipeline
                    ),
                ));
            }
        }
        Ok(())
    }

    fn apply_env(&mut self, env: &dyn Env) -> Result<(), ConfigError> {
        if let Some(urls) = env.var(ENV_WARREN_AMQP_URL) {
            self.broker.urls =
                members::parse_url_list(&urls).map_err(|message| ConfigError::Env {
                    key: ENV_WARREN_AMQP_URL,
                    message,
                })?;
        }
        if let Some(ns) = env.var(ENV_WARREN_NAMESPACE) {
            validate_name("namespace", &ns).map_err(|e| ConfigError::Env {
                key: ENV_WARREN_NAMESPACE,
                message: e.to_string(),
            })?;
            self.broker.namespace = ns;
        }
        if let Some(url) = env.var(ENV_WARREN_MANAGEMENT_URL) {
            model::check_management_url(&url).map_err(|message| ConfigError::Env {
                key: ENV_WARREN_MANAGEMENT_URL,
                message,
            })?;
            self.broker.management_url = Some(url);
        }
        Ok(())
    }

    /// A command argument that contains a `/`, is not absolute and names something that exists
    /// next to the config file is made absolute. Bare words (`python3`) stay for `PATH`; other
    /// arguments (`-c`, `s/a/b/`) stay as they are. TLS file paths are always made absolute.
    fn resolve_paths(&mut self, base_dir: &Path) {
        let base = std::fs::canonicalize(base_dir).unwrap_or_else(|_| base_dir.to_path_buf());
        if let Some(tls) = &mut self.broker.tls {
            let client = tls.client.iter_mut();
            let files = client.flat_map(|c| [&mut c.cert_file, &mut c.key_file]);
            for file in files.chain(tls.ca_file.iter_mut()) {
                *file = base.join(&*file);
            }
        }
        for step in self.pipelines.iter_mut().flat_map(|p| p.steps.iter_mut()) {
            if let StepKind::Command(argv) = &mut step.kind {
                for arg in argv.iter_mut() {
                    let candidate = base.join(&*arg);
                    if arg.contains('/') && !Path::new(arg).is_absolute() && candidate.exists() {
                        *arg = candidate.display().to_string();
                    }
                }
            }
        }
    }

    pub fn schedule(&self, name: &str) -> Option<&ScheduleConfig> {
        self.schedules.iter().find(|s| s.name == name)
    }

    pub fn pipeline(&self, name: &str) -> Option<&PipelineConfig> {
        self.pipelines.iter().find(|p| p.name == name)
    }

    /// Every handler name the config refers to, so a worker can check they are registered.
    pub fn handler_names(&self) -> impl Iterator<Item = (&PipelineConfig, &StepConfig, &str)> {
        self.pipelines.iter().flat_map(|p| {
            p.steps.iter().filter_map(move |s| match &s.kind {
                StepKind::Handler(h) => Some((p, s, h.as_str())),
                StepKind::Command(_) => None,
            })
        })
    }
}

/// serde's word for `url` and `urls` both given (one setting under two names) says which.
fn explain(message: &str) -> String {
    if message == "duplicate field `urls`" {
        "[broker] has both `url` and `urls`: give one (`urls` for several members)".into()
    } else {
        message.to_string()
    }
}

/// 1-based line number of byte offset `at`.
fn line_of(text: &str, at: usize) -> usize {
    text[..at.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::time::Duration;

    const EXAMPLE: &str = r#"
[broker]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
namespace = "warren"

[[pipelines]]
name = "thumbnails"
shards = 8
pins = { "big-customer" = 7 }

[[pipelines.steps]]
name = "fetch"
command = ["python3", "steps/fetch.py"]
timeout = "30s"
max_attempts = 5
concurrency = 4

[[pipelines.steps]]
name = "resize"
handler = "resize"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "warren.toml", Path::new("."), &HashMap::new())
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn example_parses_with_defaults() {
        let c = parse(EXAMPLE).unwrap();
        let p = c.pipeline("thumbnails").unwrap();
        assert_eq!(p.shards, 8);
        assert_eq!(p.pins["big-customer"], 7);
        let fetch = p.step("fetch").unwrap();
        assert_eq!(fetch.timeout, Duration::from_secs(30));
        assert_eq!(
            fetch.kind,
            StepKind::Command(vec!["python3".into(), "steps/fetch.py".into()])
        );
        let resize = p.next_step("fetch").unwrap();
        assert_eq!(resize.kind, StepKind::Handler("resize".into()));
        assert_eq!(resize.max_attempts, 5);
        assert_eq!(resize.concurrency, 4);
        assert_eq!(resize.timeout, Duration::from_secs(60));
        assert!(p.next_step("resize").is_none());
        assert_eq!(c.broker.queue_type, QueueType::Quorum);
    }

    #[test]
    fn empty_file_gets_broker_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.broker.namespace, "warren");
        assert_eq!(c.broker.urls, ["amqp://guest:guest@127.0.0.1:5672/%2f"]);
        assert_eq!(c.broker.connect_order, ConnectOrder::Random);
    }

    #[test]
    fn results_check_is_on_for_a_cluster_unless_told() {
        let one = parse("").unwrap();
        assert_eq!(one.results.check, ResultsCheck::Auto);
        assert_eq!(one.results.check_after, Duration::from_secs(15));
        assert!(!one.checks_results());
        let urls = "[broker]\nurls = [\"amqp://a:5672\", \"amqp://b:5672\"]\n";
        assert!(parse(urls).unwrap().checks_results());
        let off = format!("{urls}[results]\ncheck = \"off\"\n");
        assert!(!parse(&off).unwrap().checks_results());
        let on = parse("[results]\ncheck = \"on\"\ncheck_after = \"2s\"\n").unwrap();
        assert!(on.checks_results());
        assert_eq!(on.results.check_after, Duration::from_secs(2));
        let e = err("[results]\ncheck = \"sometimes\"\n");
        assert!(e.starts_with("warren.toml:2:"), "{e}");
        let e = err("[results]\ncheck_after = \"10ms\"\n");
        assert!(
            e.starts_with("warren.toml:2:") && e.contains("`check_after`"),
            "{e}"
        );
    }

    #[test]
    fn history_defaults_and_bad_values_name_key_and_line() {
        let c = parse("").unwrap();
        assert_eq!(c.history.enabled, HISTORY_ENABLED_BY_DEFAULT);
        assert_eq!(c.history.retention, Duration::from_secs(7 * 86400));
        assert_eq!(c.history.max_age(), "604800s");
        let c = parse("[history]\nenabled = false\nretention = \"36h\"\n").unwrap();
        assert!(!c.history.enabled);
        assert_eq!(c.history.max_age(), "129600s");
        let e = err("[history]\nenabled = true\nretention = \"10s\"\n");
        assert!(
            e.starts_with("warren.toml:3:") && e.contains("`retention`"),
            "{e}"
        );
        let e = err("[history]\nretention = \"soon\"\n");
        assert!(e.starts_with("warren.toml:2:"), "{e}");
        let e = err("[history]\nenable = true\n");
        assert!(
            e.starts_with("warren.toml:2:") && e.contains("unknown field `enable`"),
            "{e}"
        );
        let e = err("[history]\nenabled = \"yes\"\n");
        assert!(e.starts_with("warren.toml:2:"), "{e}");
    }

    #[test]
    fn typo_names_key_and_line() {
        let text = EXAMPLE.replace("timeout = \"30s\"", "timout = \"30s\"");
        let e = err(&text);
        assert!(e.starts_with("warren.toml:14:"), "{e}");
        assert!(e.contains("unknown field `timout`"), "{e}");
    }

    #[test]
    fn bad_values_name_key_and_line() {
        let e = err(&EXAMPLE.replace("shards = 8", "shards = 0"));
        assert!(
            e.starts_with("warren.toml:8:") && e.contains("`shards`"),
            "{e}"
        );
        let e = err(&EXAMPLE.replace("concurrency = 4", "concurrency = -1"));
        assert!(e.contains(":16:") && e.contains("`concurrency`"), "{e}");
        let e = err(&EXAMPLE.replace("\"30s\"", "\"soon\""));
        assert!(e.contains(":14:"), "{e}");
        let e = err(&EXAMPLE.replace("= 7 }", "= 8 }"));
        assert!(e.contains("pins.big-customer = 8"), "{e}");
        let e = err(&EXAMPLE.replace("name = \"fetch\"", "name = \"fe.tch\""));
        assert!(e.contains(":12:") && e.contains("fe.tch"), "{e}");
        let e = err(&EXAMPLE.replace("namespace = \"warren\"", "namespace = \"a#b\""));
        assert!(e.contains(":4:") && e.contains("namespace"), "{e}");
    }

    #[test]
    fn priorities_default_to_all_and_are_checked_by_line() {
        let c = parse(EXAMPLE).unwrap();
        assert_eq!(c.pipelines[0].priorities, crate::Priority::ALL);
        let with = |list: &str| {
            EXAMPLE.replace(
                "shards = 8\n",
                &format!("shards = 8\npriorities = {list}\n"),
            )
        };
        let c = parse(&with("[\"low\", \"high\"]")).unwrap();
        let p = &c.pipelines[0];
        assert_eq!(p.priorities, [crate::Priority::High, crate::Priority::Low]);
        assert!(p.has_priority(crate::Priority::High) && !p.has_priority(crate::Priority::Normal));
        let e = err(&with("[]"));
        assert!(
            e.starts_with("warren.toml:9:") && e.contains("`priorities` needs"),
            "{e}"
        );
        let e = err(&with("[\"normal\", \"normal\"]"));
        assert!(
            e.starts_with("warren.toml:9:") && e.contains("normal twice"),
            "{e}"
        );
        let e = err(&with("[\"urgent\"]"));
        assert!(
            e.starts_with("warren.toml:9:") && e.contains("urgent"),
            "{e}"
        );
    }

    #[test]
    fn step_kind_must_be_one() {
        let e = err(&EXAMPLE.replace("handler = \"resize\"", ""));
        assert!(e.contains("set `command` or `handler`"), "{e}");
        let e = err(&EXAMPLE.replace("handler = \"resize\"", "handler = \"r\"\ncommand = [\"x\"]"));
        assert!(e.contains("not both"), "{e}");
        let e = err(&EXAMPLE.replace("name = \"resize\"", "name = \"fetch\""));
        assert!(e.contains("duplicate step name `fetch`"), "{e}");
    }

    #[test]
    fn caps_are_optional_positive_and_named_by_line() {
        let with = |line: &str| {
            EXAMPLE.replace("concurrency = 4\n", &format!("concurrency = 4\n{line}\n"))
        };
        let c = parse(EXAMPLE).unwrap();
        let fetch = c.pipeline("thumbnails").unwrap().step("fetch").unwrap();
        assert_eq!(
            (fetch.max_in_flight, fetch.tenant_max_in_flight),
            (None, None)
        );
        let c = parse(&with("max_in_flight = 3\ntenant_max_in_flight = 1")).unwrap();
        let fetch = c.pipeline("thumbnails").unwrap().step("fetch").unwrap();
        assert_eq!(
            (fetch.max_in_flight, fetch.tenant_max_in_flight),
            (Some(3), Some(1))
        );
        // Line 17 is the one after `concurrency = 4`.
        let e = err(&with("max_in_flight = 0"));
        assert!(
            e.contains(":17:") && e.contains("`max_in_flight` must be between 1 and 10000, got 0"),
            "{e}"
        );
        let e = err(&with("tenant_max_in_flight = 0"));
        assert!(
            e.contains(":17:") && e.contains("`tenant_max_in_flight`") && e.contains("got 0"),
            "{e}"
        );
        let e = err(&with("max_in_flight = 10001"));
        assert!(e.contains("`max_in_flight`"), "{e}");
        let e = err(&with("max_in_flight = \"4\""));
        assert!(e.contains(":17:") && e.contains("invalid type"), "{e}");
    }

    #[test]
    fn fan_out_is_checked_by_key_and_line() {
        let base = format!(
            "{EXAMPLE}\n[[pipelines]]\nname = \"part\"\n[[pipelines.steps]]\nname = \"x\"\nhandler = \"x\"\n"
        );
        let with =
            |line: &str| base.replace("concurrency = 4\n", &format!("concurrency = 4\n{line}\n"));
        let c = parse(&with(
            "fan_out = \"part\"\nmax_parts_in_flight = 5\non_part_failure = \"wait\"",
        ))
        .unwrap();
        let fan_out = c.pipelines[0].steps[0].fan_out.clone().unwrap();
        assert_eq!(fan_out.pipeline, "part");
        assert_eq!(fan_out.max_parts_in_flight, Some(5));
        assert_eq!(fan_out.on_part_failure, OnPartFailure::Wait);
        let c = parse(&with("fan_out = \"part\"")).unwrap();
        let fan_out = c.pipelines[0].steps[0].fan_out.clone().unwrap();
        assert_eq!(
            (fan_out.max_parts_in_flight, fan_out.on_part_failure),
            (None, OnPartFailure::Continue)
        );
        // Line 17 is the one after `concurrency = 4`.
        let e = err(&with("fan_out = \"nope\""));
        assert!(
            e.starts_with("warren.toml:17:")
                && e.contains("`fan_out` names no pipeline")
                && e.contains("nope"),
            "{e}"
        );
        let e = err(&with("fan_out = \"part\"\nmax_parts_in_flight = 0"));
        assert!(
            e.contains(":18:") && e.contains("`max_parts_in_flight`"),
            "{e}"
        );
        let e = err(&with("fan_out = \"part\"\non_part_failure = \"ignore\""));
        assert!(e.contains(":18:") && e.contains("ignore"), "{e}");
        let e = err(&with("max_parts_in_flight = 3"));
        assert!(
            e.contains("`max_parts_in_flight` is for a step with `fan_out`"),
            "{e}"
        );
        let last = base.replace(
            "handler = \"x\"\n",
            "handler = \"x\"\nfan_out = \"thumbnails\"\n",
        );
        let e = err(&last);
        assert!(e.contains("step `x` has `fan_out` but no next step"), "{e}");
    }

    #[test]
    fn schedules_parse_with_defaults_and_name_bad_keys_by_line() {
        let with = |table: &str| format!("{EXAMPLE}\n[[schedules]]\n{table}\n");
        let c = parse(&with(
            "name = \"nightly\"\npipeline = \"thumbnails\"\ncron = \"0 2 * * *\"\n\
             timezone = \"Europe/Warsaw\"\ntenants = [\"acme\", \"globex\"]\n\
             payload = { full = false }\ncatch_up = \"6h\"\npriority = \"low\"",
        ))
        .unwrap();
        let s = c.schedule("nightly").unwrap();
        assert_eq!(s.tenants.len(), 2);
        assert_eq!(s.catch_up, Duration::from_secs(6 * 3600));
        assert_eq!(s.overlap, Overlap::Skip);
        assert_eq!(s.priority, crate::Priority::Low);
        assert_eq!(s.payload["full"], serde_json::json!(false));
        let c = parse(&with(
            "name = \"s\"\npipeline = \"thumbnails\"\nevery = \"30s\"",
        ))
        .unwrap();
        let s = c.schedule("s").unwrap();
        assert_eq!(s.tenants[0].as_str(), DEFAULT_SCHEDULE_TENANT);
        assert_eq!(s.catch_up, Duration::from_secs(3600));
        // Its `name` is on line 23 of this text, its fourth key on line 26.
        let base = "name = \"s\"\npipeline = \"thumbnails\"\n";
        let e = err(&with(&format!(
            "{base}every = \"30s\"\ntimezone = \"Mars/Base\""
        )));
        assert!(e.contains(":26:") && e.contains("`timezone`"), "{e}");
        let e = err(&with(&format!("{base}cron = \"0 2 * *\"")));
        assert!(e.contains("`cron`") && e.contains("4 fields"), "{e}");
        let e = err(&with(&format!(
            "{base}cron = \"0 2 * * *\"\nevery = \"1s\""
        )));
        assert!(e.contains("not both"), "{e}");
        let e = err(&with(&format!("{base}every = \"1s\"\noverlap = \"queue\"")));
        assert!(e.contains(":26:") && e.contains("variant"), "{e}");
        let e = err(&with(&format!("{base}every = \"1s\"\ntenant = \"a.b\"")));
        assert!(e.contains(":26:") && e.contains("tenant"), "{e}");
        let e = err(&with(&format!("{base}every = \"1s\"\ncatchup = \"1h\"")));
        assert!(e.contains(":26:") && e.contains("catchup"), "{e}");
        let e = err(&with("name = \"s\"\npipeline = \"nope\"\nevery = \"1s\""));
        assert!(
            e.contains(":24:") && e.contains("`pipeline`") && e.contains("nope"),
            "{e}"
        );
    }

    #[test]
    fn pass_env_is_checked() {
        let with = |line: &str| {
            EXAMPLE.replace("concurrency = 4\n", &format!("concurrency = 4\n{line}\n"))
        };
        let c = parse(&with("pass_env = [\"DATABASE_URL\"]")).unwrap();
        let fetch = c.pipeline("thumbnails").unwrap().step("fetch").unwrap();
        assert_eq!(fetch.pass_env, vec!["DATABASE_URL".to_string()]);
        let e = err(&with("pass_env = [\"WARREN_AMQP_URL\"]"));
        assert!(
            e.contains("`pass_env`") && e.contains("never passed"),
            "{e}"
        );
        let e = err(&with("pass_env = [\"A=B\"]"));
        assert!(e.contains("not a variable name"), "{e}");
        let handler = EXAMPLE.replace(
            "handler = \"resize\"",
            "handler = \"resize\"\npass_env = [\"HOME\"]",
        );
        assert!(err(&handler).contains("for command steps"));
    }

    #[test]
    fn tls_files_come_in_pairs_and_resolve_next_to_the_config() {
        let tls = "[broker]\nurl = \"amqps://u:p@h/v\"\n[broker.tls]\nca_file = \"ca.pem\"\n";
        let c = Config::parse(
            tls,
            "warren.toml",
            Path::new("/etc/warren"),
            &HashMap::new(),
        )
        .unwrap();
        let tls_config = c.broker.tls.unwrap();
        assert_eq!(
            tls_config.ca_file,
            Some(PathBuf::from("/etc/warren/ca.pem"))
        );
        assert_eq!(tls_config.client, None);
        let e = err("[broker.tls]\ncert_file = \"c.pem\"\n");
        assert!(
            e.starts_with("warren.toml:1:") && e.contains("needs `key_file`"),
            "{e}"
        );
        let e = err("[broker.tls]\nca = \"c.pem\"\n");
        assert!(e.contains("unknown field `ca`"), "{e}");
    }

    #[test]
    fn debug_output_hides_the_password() {
        let c = parse("[broker]\nurl = \"amqp://guest:s3cret@h:5672/%2f\"\n").unwrap();
        let text = format!("{c:?}");
        assert!(
            !text.contains("s3cret") && text.contains("guest:***@h"),
            "{text}"
        );
    }

    #[test]
    fn management_url_is_checked_and_env_wins() {
        let c = parse("[broker]\nmanagement_url = \"http://u:pw@h:15672\"\n").unwrap();
        assert_eq!(
            c.broker.management_url.as_deref(),
            Some("http://u:pw@h:15672")
        );
        assert!(!format!("{c:?}").contains("pw@"), "{c:?}");
        let e = err("[broker]\nmanagement_url = \"h:15672\"\n");
        assert!(e.contains("warren.toml:2") && e.contains("http://"), "{e}");
        let env = HashMap::from([(
            ENV_WARREN_MANAGEMENT_URL.to_string(),
            "https://rabbit:15671".to_string(),
        )]);
        let c = Config::parse(EXAMPLE, "x", Path::new("."), &env).unwrap();
        assert_eq!(
            c.broker.management_url.as_deref(),
            Some("https://rabbit:15671")
        );
        let bad = HashMap::from([(ENV_WARREN_MANAGEMENT_URL.to_string(), "ftp://x".to_string())]);
        let e = Config::parse(EXAMPLE, "x", Path::new("."), &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("WARREN_MANAGEMENT_URL"), "{e}");
    }

    #[test]
    fn connect_timeout_defaults_and_is_checked() {
        assert_eq!(
            parse("").unwrap().broker.connect_timeout,
            Duration::from_secs(10)
        );
        let c = parse("[broker]\nconnect_timeout = \"1500ms\"\n").unwrap();
        assert_eq!(c.broker.connect_timeout, Duration::from_millis(1500));
        let e = err("[broker]\nnamespace = \"w\"\nconnect_timeout = \"0s\"\n");
        assert!(
            e.starts_with("warren.toml:3:") && e.contains("`connect_timeout` must be more"),
            "{e}"
        );
        let e = err("[broker]\nconnect_timeout = \"soon\"\n");
        assert!(e.starts_with("warren.toml:2:"), "{e}");
        let e = err("[broker]\nconnect_timeout = 10\n");
        assert!(e.starts_with("warren.toml:2:"), "{e}");
    }

    #[test]
    fn env_wins() {
        let env = HashMap::from([
            (
                ENV_WARREN_AMQP_URL.to_string(),
                "amqp://u:p@rabbit:5672/%2f".to_string(),
            ),
            (ENV_WARREN_NAMESPACE.to_string(), "test-1".to_string()),
        ]);
        let c = Config::parse(EXAMPLE, "x", Path::new("."), &env).unwrap();
        assert_eq!(c.broker.urls, ["amqp://u:p@rabbit:5672/%2f"]);
        assert_eq!(c.broker.namespace, "test-1");
        let bad = HashMap::from([(ENV_WARREN_NAMESPACE.to_string(), "a.b".to_string())]);
        let e = Config::parse(EXAMPLE, "x", Path::new("."), &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("WARREN_NAMESPACE"), "{e}");
    }

    #[test]
    fn one_url_or_a_list_of_members() {
        // Given `url` (one broker), `urls` (a cluster), or both
        let one = parse("[broker]\nurl = \"amqp://a:5672/%2f\"\n").unwrap();
        let many = parse(
            "[broker]\nurls = [\"amqp://a:5701\", \"amqp://b:5702\"]\nconnect_order = \"listed\"\n",
        )
        .unwrap();
        // Then each gives the members, in order
        assert_eq!(one.broker.urls, ["amqp://a:5672/%2f"]);
        assert_eq!(one.broker.url(), "amqp://a:5672/%2f");
        assert_eq!(many.broker.urls, ["amqp://a:5701", "amqp://b:5702"]);
        assert_eq!(many.broker.connect_order, ConnectOrder::Listed);
        // ...and a bad member, an empty list or both keys are refused, naming key and line
        let e = err("[broker]\nnamespace = \"w\"\nurls = [\"amqp://a\", \"b:5672\"]\n");
        assert!(
            e.starts_with("warren.toml:3:") && e.contains("urls[1]") && e.contains("amqp://"),
            "{e}"
        );
        let e = err("[broker]\nurls = []\n");
        assert!(
            e.starts_with("warren.toml:2:") && e.contains("`urls`"),
            "{e}"
        );
        let e = err("[broker]\nurl = \"amqp://a\"\nurls = [\"amqp://b\"]\n");
        assert!(e.contains("both `url` and `urls`"), "{e}");
        let e = err("[broker]\nconnect_order = \"nearest\"\n");
        assert!(
            e.starts_with("warren.toml:2:") && e.contains("random"),
            "{e}"
        );
        // ...and WARREN_AMQP_URL takes a comma-separated list, checked and named on error
        let env = HashMap::from([(
            ENV_WARREN_AMQP_URL.to_string(),
            "amqp://x:5701, amqp://y:5702".to_string(),
        )]);
        let c = Config::parse(EXAMPLE, "x", Path::new("."), &env).unwrap();
        assert_eq!(c.broker.urls, ["amqp://x:5701", "amqp://y:5702"]);
        let bad = HashMap::from([(ENV_WARREN_AMQP_URL.to_string(), "amqp://x,".to_string())]);
        let e = Config::parse(EXAMPLE, "x", Path::new("."), &bad)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("WARREN_AMQP_URL") && e.contains("urls[1]"),
            "{e}"
        );
    }

    #[test]
    fn relative_command_paths_resolve_against_config_folder() {
        let dir = std::env::temp_dir().join(format!("warren-cfg-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("steps")).unwrap();
        std::fs::write(dir.join("steps/fetch.py"), "").unwrap();
        std::fs::write(dir.join("warren.toml"), EXAMPLE).unwrap();
        let c = Config::load(Some(&dir.join("warren.toml")), &HashMap::new()).unwrap();
        let StepKind::Command(argv) = &c.pipelines[0].steps[0].kind else {
            panic!()
        };
        assert_eq!(argv[0], "python3");
        assert!(Path::new(&argv[1]).is_absolute() && argv[1].ends_with("steps/fetch.py"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_file_is_named() {
        let e = Config::load(Some(Path::new("/nope/warren.toml")), &HashMap::new()).unwrap_err();
        assert!(e.to_string().contains("/nope/warren.toml"), "{e}");
    }
}
