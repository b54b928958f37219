//! Logging set-up (text or JSON lines) and the one place that hides secrets in URLs.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::env::{Env, ENV_WARREN_LOG};

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!(
                "invalid log format {other:?}: expected text or json"
            )),
        }
    }
}

/// Default log filter. lapin logs channel closes at ERROR from its I/O loop; warren reports the
/// same failures through its own errors, with context, so lapin's lines are off unless asked for.
pub const DEFAULT_FILTER: &str = "info,lapin=off";

/// Installs the global subscriber on stderr; the filter comes from `WARREN_LOG`
/// (default [`DEFAULT_FILTER`]).
/// Calling it twice is harmless.
pub fn init(format: LogFormat, env: &dyn Env) {
    let filter = env
        .var(ENV_WARREN_LOG)
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(DEFAULT_FILTER));
    // Colours only for a terminal: logs redirected to a file stay plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        // A closed stderr (the supervisor that read it died) must not turn a log line into a
        // panic: the default reports the failed write with `eprintln!`, which panics then.
        .log_internal_errors(false)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// `amqp://user:secret@host/vhost` -> `amqp://user:***@host/vhost`, for logs and errors.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_string();
    };
    let user_info = &rest[..at];
    let user = user_info.split(':').next().unwrap_or("");
    format!("{}{user}:***{}", &url[..scheme_end], &rest[at..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_password_only() {
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("amqps://u:p@w@h/v"), "amqps://u:***@h/v");
        assert_eq!(redact_url("amqp://127.0.0.1:5672"), "amqp://127.0.0.1:5672");
        assert_eq!(redact_url("nonsense"), "nonsense");
    }
}
