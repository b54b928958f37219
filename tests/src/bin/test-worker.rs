//! The worker binary the integration tests run: the stock `warren-worker` command line plus Rust
//! handlers whose behaviour the job payload controls, and which leave a marker file per start.
//! It doubles as the example of a custom worker binary.

use std::time::Duration;

use serde_json::{json, Value};
use warren_worker::{handler_fn, StepContext, StepError};

/// `work`: appends the step name to `trail`; optionally sleeps (`sleep_ms`, or
/// `sleep_ms_at: {step: ms}`; `mark_sleep_end: true` leaves a `slept-` marker after), panics
/// (`panic_at: step` on attempt 1) or fails (`fail_at: step` retryable until attempt
/// `fail_times`+1, `fail_permanently_at: step` unless the file named by
/// `fail_permanently_at_unless_file` exists). Records each step's trace id in `traces`.
async fn work(mut input: Value, ctx: StepContext) -> Result<Value, StepError> {
    if let Ok(dir) = std::env::var(warren_tests::ENV_TEST_DIR) {
        let name = format!(
            "{}.{}.{}.{}",
            ctx.job_id,
            ctx.step,
            ctx.attempt,
            uuid::Uuid::now_v7().simple()
        );
        let _ = std::fs::write(format!("{dir}/{name}"), warren_common::now_ms().to_string());
    }
    let at = |key: &str| input.get(key).and_then(Value::as_str) == Some(ctx.step.as_str());
    let sleep = input
        .get("sleep_ms_at")
        .and_then(|m| m.get(&ctx.step))
        .or_else(|| input.get("sleep_ms"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(sleep)).await;
    let mark_end = input.get("mark_sleep_end") == Some(&json!(true));
    if let (Ok(dir), true) = (std::env::var(warren_tests::ENV_TEST_DIR), mark_end) {
        // Proof that the sleep ran to its end (a timed-out attempt must not get here).
        let name = format!("slept-{}-{}-{}", ctx.job_id, ctx.step, ctx.attempt);
        let _ = std::fs::write(format!("{dir}/{name}"), "");
    }
    if at("panic_at") && ctx.attempt == 1 {
        panic!("test panic at {}", ctx.step);
    }
    let fixed = input
        .get("fail_permanently_at_unless_file")
        .and_then(Value::as_str)
        .is_some_and(|path| std::path::Path::new(path).exists());
    if at("fail_permanently_at") && !fixed {
        return Err(StepError::permanent("told to fail permanently"));
    }
    let fail_times = input.get("fail_times").and_then(Value::as_u64).unwrap_or(0);
    if at("fail_at") && u64::from(ctx.attempt) <= fail_times {
        return Err(StepError::retryable(format!(
            "told to fail, attempt {}",
            ctx.attempt
        )));
    }
    match input.get_mut("trail").and_then(Value::as_array_mut) {
        Some(trail) => trail.push(json!(ctx.step)),
        None => input["trail"] = json!([ctx.step]),
    }
    input["tenant_seen"] = json!(ctx.tenant);
    let trace = ctx.trace.map(|t| t.trace_id_hex());
    match input.get_mut("traces").and_then(Value::as_array_mut) {
        Some(traces) => traces.push(json!(trace)),
        None => input["traces"] = json!([trace]),
    }
    Ok(input)
}

/// `span`: sleeps `sleep_ms` and says when it ran (µs of the system clock), in which process and
/// for which tenant, so a test can count how many ran at once across workers.
async fn span(input: Value, ctx: StepContext) -> Result<Value, StepError> {
    let now_us = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64)
    };
    let start_us = now_us();
    let sleep = input.get("sleep_ms").and_then(Value::as_u64).unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(sleep)).await;
    Ok(json!({
        "start_us": start_us,
        "end_us": now_us(),
        "pid": std::process::id(),
        "tenant": ctx.tenant,
    }))
}

/// `plan`: a fan-out step's handler: its output is the input's `parts` (a list of parts).
async fn plan(input: Value, _ctx: StepContext) -> Result<Value, StepError> {
    Ok(input.get("parts").cloned().unwrap_or(Value::Null))
}

fn main() -> std::process::ExitCode {
    warren_worker::cli::main(|builder| {
        builder
            .handler("work", handler_fn(work))
            .handler("span", handler_fn(span))
            .handler("plan", handler_fn(plan))
    })
}
