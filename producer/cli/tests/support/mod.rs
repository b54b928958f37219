//! What the console's tests share: a `warren console` process and its health.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::Value;

/// A child process killed when dropped.
pub(crate) struct Killed(pub(crate) Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `<bin> --config <config> console --listen 127.0.0.1:0` without credentials from the
/// caller's environment; returns it and its URL (from the line it prints once it listens).
pub(crate) fn start_console(bin: &str, config: &Path) -> (Killed, String) {
    let mut child = Command::new(bin)
        .arg("--config")
        .arg(config)
        .args(["console", "--listen", "127.0.0.1:0"])
        .env_remove("WARREN_CONSOLE_TOKEN")
        .env_remove("WARREN_CONSOLE_BASIC_AUTH")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("warren console: ")
        .unwrap_or_else(|| panic!("console said {line:?}"))
        .trim_end_matches('/')
        .to_string();
    (Killed(child), url)
}

/// `/api/health`, or `None` while it does not answer.
pub(crate) async fn health(http: &reqwest::Client, url: &str) -> Option<Value> {
    let response = http.get(format!("{url}/api/health")).send().await.ok()?;
    response.json().await.ok()
}
