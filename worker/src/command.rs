//! Command steps (DESIGN.md contract 2): the step input as JSON on stdin, `WARREN_*` variables in
//! a clean environment, stdout is the output JSON. Exit 0 succeeds, exit 65 fails for good,
//! anything else (another code, a signal, a timeout) is worth a retry. The command runs in its
//! own process group, and the whole group is killed on timeout or when the attempt is dropped
//! (worker shutdown past its grace period), so no grandchild outlives its step.

use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use warren_common::env as keys;

use crate::handler::{StepContext, StepError};

/// Exit code of a permanent failure (BSD sysexits EX_DATAERR).
pub(crate) const EXIT_PERMANENT: i32 = 65;

/// How much of stderr is kept with a failure.
const STDERR_TAIL_BYTES: usize = 2048;

/// Variables passed through from the worker's own environment, besides a step's `pass_env`.
/// Nothing else is: the broker credentials in `WARREN_AMQP_URL` must never reach step code.
pub(crate) const ENV_ALLOW_LIST: &[&str] = &[
    "PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "USER",
];

/// A command step: the program with its arguments, and the variables of the worker's
/// environment it also gets (the step's `pass_env`, which the config keeps free of
/// `WARREN_AMQP_URL`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CommandSpec {
    pub(crate) argv: Vec<String>,
    pub(crate) pass_env: Vec<String>,
}

impl CommandSpec {
    /// Runs the command for one attempt, passing the worker's variables named in
    /// [`ENV_ALLOW_LIST`] and `pass_env`.
    pub(crate) async fn run(
        &self,
        input: &Value,
        ctx: &StepContext,
        timeout: Duration,
    ) -> Result<Value, StepError> {
        let (argv, pass_env) = (&self.argv, &self.pass_env);
        let passed = ENV_ALLOW_LIST
            .iter()
            .copied()
            .chain(pass_env.iter().map(String::as_str))
            .filter_map(|k| std::env::var(k).ok().map(|v| (k, v)));
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .env_clear()
            .envs(passed)
            .env(keys::ENV_WARREN_JOB_ID, ctx.job_id.to_string())
            .env(keys::ENV_WARREN_TENANT, &ctx.tenant)
            .env(keys::ENV_WARREN_PIPELINE, &ctx.pipeline)
            .env(keys::ENV_WARREN_STEP, &ctx.step)
            .env(keys::ENV_WARREN_ATTEMPT, ctx.attempt.to_string())
            .env(keys::ENV_WARREN_PRIORITY, ctx.priority.as_str())
            .env(keys::ENV_WARREN_IDEMPOTENCY_KEY, ctx.idempotency_key())
            // The OpenTelemetry convention for handing trace context to a child process.
            .envs(ctx.trace.map(|t| ("TRACEPARENT", t.to_string())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| StepError::retryable(format!("cannot start {:?}: {e}", argv[0])))?;
        let group = GroupGuard(child.id().map(|pid| Pid::from_raw(pid as i32)));

        // Feed stdin and drain both pipes at once, so a chatty step cannot deadlock on a full pipe.
        let stdin_bytes = serde_json::to_vec(input).expect("JSON values serialise");
        let mut stdin = child.stdin.take().expect("piped stdin");
        let feed = async move {
            // A step that exits without reading its input is fine: ignore the broken pipe.
            let _ = stdin.write_all(&stdin_bytes).await;
            drop(stdin);
        };
        let stdout = read_all(child.stdout.take().expect("piped stdout"));
        let stderr = read_all(child.stderr.take().expect("piped stderr"));
        let work = async { tokio::join!(feed, stdout, stderr, child.wait()) };

        let (_, stdout, stderr, status) = match tokio::time::timeout(timeout, work).await {
            Ok(done) => done,
            Err(_) => {
                // Dropping `group` kills the whole process group.
                drop(group);
                return Err(StepError::retryable(format!(
                    "timed out after {}",
                    humantime::format_duration(timeout)
                )));
            }
        };
        group.disarm();
        let status =
            status.map_err(|e| StepError::retryable(format!("lost the step process: {e}")))?;
        let tail = stderr_tail(&stderr);
        match status.code() {
            Some(0) => parse_output(&stdout),
            Some(EXIT_PERMANENT) => {
                Err(StepError::permanent(format!("exit {EXIT_PERMANENT}{tail}")))
            }
            Some(code) => Err(StepError::retryable(format!("exit {code}{tail}"))),
            None => {
                use std::os::unix::process::ExitStatusExt;
                let signal = status.signal().unwrap_or(0);
                Err(StepError::retryable(format!(
                    "killed by signal {signal}{tail}"
                )))
            }
        }
    }
}

async fn read_all(mut pipe: impl AsyncRead + Unpin) -> Vec<u8> {
    let mut buf = Vec::new();
    let _ = pipe.read_to_end(&mut buf).await;
    buf
}

fn parse_output(stdout: &[u8]) -> Result<Value, StepError> {
    let text = String::from_utf8_lossy(stdout);
    if text.trim().is_empty() {
        return Ok(Value::Null);
    }
    // A step that prints something that is not JSON has a bug; retrying will not fix it.
    serde_json::from_str(&text).map_err(|e| {
        let start: String = text.chars().take(200).collect();
        StepError::permanent(format!("stdout is not JSON ({e}): {start:?}"))
    })
}

fn stderr_tail(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let text = text.trim();
    if text.is_empty() {
        return String::new();
    }
    let mut start = text.len().saturating_sub(STDERR_TAIL_BYTES);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!(": {}", &text[start..])
}

/// Kills the process group when dropped, unless disarmed after a normal exit.
struct GroupGuard(Option<Pid>);

impl GroupGuard {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use warren_common::trace::TraceParent;
    use warren_common::{JobId, Priority};

    fn ctx() -> StepContext {
        StepContext {
            job_id: JobId::new(),
            tenant: "acme".into(),
            pipeline: "p".into(),
            step: "s".into(),
            attempt: 2,
            priority: Priority::High,
            trace: None,
        }
    }

    fn spec(argv: &[&str], pass_env: &[&str]) -> CommandSpec {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        CommandSpec {
            argv: strings(argv),
            pass_env: strings(pass_env),
        }
    }

    async fn sh(script: &str, input: Value, timeout_ms: u64) -> Result<Value, StepError> {
        spec(&["sh", "-c", script], &[])
            .run(&input, &ctx(), Duration::from_millis(timeout_ms))
            .await
    }

    #[tokio::test]
    async fn stdin_to_stdout() {
        assert_eq!(
            sh("cat", json!({"a": [1, 2]}), 5_000).await,
            Ok(json!({"a": [1, 2]}))
        );
        assert_eq!(sh("true", json!(1), 5_000).await, Ok(Value::Null));
    }

    #[tokio::test]
    async fn sees_warren_env_and_only_the_variables_it_is_given() {
        // cargo sets CARGO_* for the test process; only what is passed reaches the step
        assert!(
            std::env::var("CARGO_PKG_NAME").is_ok() && std::env::var("CARGO_MANIFEST_DIR").is_ok()
        );
        let script = r#"printf '["%s","%s","%s","%s","%s","%s","%s","%s"]' "$WARREN_TENANT" "$WARREN_PIPELINE" "$WARREN_STEP" "$WARREN_ATTEMPT" "$WARREN_PRIORITY" "${CARGO_MANIFEST_DIR:-unset}" "${CARGO_PKG_NAME:-unset}" "${PATH:+path}""#;
        let out = spec(&["sh", "-c", script], &["CARGO_PKG_NAME"])
            .run(&Value::Null, &ctx(), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(
            out,
            json!([
                "acme",
                "p",
                "s",
                "2",
                "high",
                "unset",
                "warren-worker",
                "path"
            ])
        );
    }

    #[tokio::test]
    async fn trace_context_reaches_the_command() {
        let command = spec(&["sh", "-c", r#"printf '"%s"' "$TRACEPARENT""#], &[]);
        let mut ctx = ctx();
        let trace: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap();
        ctx.trace = Some(trace);
        let out = command
            .run(&Value::Null, &ctx, Duration::from_secs(5))
            .await;
        assert_eq!(out, Ok(json!(trace.to_string())));
    }

    #[tokio::test]
    async fn exit_codes_decide_retry() {
        let e = sh("echo bad input >&2; exit 65", Value::Null, 5_000)
            .await
            .unwrap_err();
        assert_eq!(e, StepError::Permanent("exit 65: bad input".into()));
        let e = sh("echo flaky >&2; exit 3", Value::Null, 5_000)
            .await
            .unwrap_err();
        assert_eq!(e, StepError::Retryable("exit 3: flaky".into()));
        let e = sh("kill -9 $$", Value::Null, 5_000).await.unwrap_err();
        assert!(
            e.is_retryable() && e.to_string().contains("signal 9"),
            "{e}"
        );
        let e = sh("echo not json", Value::Null, 5_000).await.unwrap_err();
        assert!(!e.is_retryable(), "{e}");
        let e = spec(&["/no/such/program"], &[])
            .run(&Value::Null, &ctx(), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(
            e.is_retryable() && e.to_string().contains("/no/such/program"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let marker = std::env::temp_dir().join(format!("warren-grandchild-{}", std::process::id()));
        let _ = std::fs::remove_file(&marker);
        // A grandchild that would write the marker after 1.5 s, unless it is killed with the group.
        let script = format!("(sleep 1.5; touch {}) & sleep 30", marker.display());
        let started = std::time::Instant::now();
        let e = sh(&script, Value::Null, 300).await.unwrap_err();
        assert!(
            e.is_retryable() && e.to_string().contains("timed out"),
            "{e}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(2_000)).await;
        assert!(!marker.exists(), "the grandchild survived the timeout");
    }
}
