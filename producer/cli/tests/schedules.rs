//! `warren schedules` as a new user runs it: list, trigger, pause, resume, backfill, against
//! the real broker (no worker: the jobs fired just wait in their queues), and the mistakes the
//! command catches before connecting.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value};
use warren_common::JobId;
use warren_tests::TestNamespace;

const WARREN: &str = env!("CARGO_BIN_EXE_warren");

/// Two schedules of a one-step pipeline: `pair` fires 2 jobs a slot, `solo` 1.
const SCHEDULES: &str = r#"
[[pipelines]]
name = "sync"
shards = 1

[[pipelines.steps]]
name = "a"
handler = "a"

[[schedules]]
name = "pair"
pipeline = "sync"
every = "1h"
tenants = ["acme", "globex"]

[[schedules]]
name = "solo"
pipeline = "sync"
every = "1h"
tenant = "ops"
"#;

fn warren(config: &Path, args: &[&str]) -> Output {
    Command::new(WARREN)
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("WARREN_LOG")
        .output()
        .expect("run warren")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Succeeded, printed nothing on stderr (no warning, no log line), and its stdout.
fn ok(out: &Output) -> String {
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    assert_eq!(stderr, "", "stderr of a clean run; stdout: {stdout}");
    stdout
}

/// A config whose broker nothing answers: a command that passes with it never connected.
fn offline_config(name: &str, rest: &str) -> (PathBuf, tempdir::Dir) {
    let dir = tempdir::Dir::new(name);
    let path = dir.0.join("warren.toml");
    let body = format!(
        "[broker]\nurl = \"amqp://guest:guest@127.0.0.1:1/%2f\"\nnamespace = \"offline\"\n{rest}"
    );
    std::fs::write(&path, body).expect("write config");
    (path, dir)
}

mod tempdir {
    /// A folder under the temp dir, removed when dropped.
    pub(crate) struct Dir(pub(crate) std::path::PathBuf);

    impl Dir {
        pub(crate) fn new(name: &str) -> Self {
            let path = std::env::temp_dir().join(format!("warren-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&path).expect("temp dir");
            Self(path)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[test]
fn without_schedules_it_says_so_without_connecting() {
    let pipeline =
        "[[pipelines]]\nname = \"p\"\n\n[[pipelines.steps]]\nname = \"a\"\nhandler = \"a\"\n";
    let (config, _dir) = offline_config("no-schedules", pipeline);
    assert_eq!(
        ok(&warren(&config, &["schedules"])),
        "no schedules in the config\n"
    );
    assert_eq!(ok(&warren(&config, &["--json", "schedules"])), "[]\n");
}

#[test]
fn a_backfill_from_after_to_is_a_usage_error() {
    let (config, _dir) = offline_config("backfill-range", SCHEDULES);
    let out = warren(
        &config,
        &[
            "schedules",
            "backfill",
            "solo",
            "--from",
            "2026-01-02T00:00:00Z",
            "--to",
            "2026-01-01T00:00:00Z",
        ],
    );
    assert_eq!(out.status.code(), Some(64), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stderr),
        "warren: --from 2026-01-02T00:00:00Z is after --to 2026-01-01T00:00:00Z; nothing to backfill\n"
    );
    assert_eq!(text(&out.stdout), "");
}

#[tokio::test]
async fn list_trigger_pause_resume_and_backfill_read_well() {
    let ns = TestNamespace::new(SCHEDULES).await;
    // Nothing else runs on this test's runtime, so the blocking calls below hold up nobody.
    let run = |args: &[&str]| ok(&warren(&ns.config_path, args));

    // The list: both schedules, active, never fired.
    let list = run(&["schedules"]);
    assert!(
        list.contains("pair  active  1h (UTC)  pipeline sync  tenants acme,globex\n"),
        "{list}"
    );
    assert!(list.contains("last fire -\n"), "{list}");

    // Two triggers: fresh ids each time; a count of one is singular.
    let first = job_ids(&run(&["--json", "schedules", "trigger", "pair"]));
    let second = job_ids(&run(&["--json", "schedules", "trigger", "pair"]));
    assert_eq!((first.len(), second.len()), (2, 2));
    assert!(
        first.iter().all(|id| !second.contains(id)),
        "{first:?} {second:?}"
    );
    let solo = run(&["schedules", "trigger", "solo"]);
    assert!(solo.starts_with("fired solo: 1 job\n  "), "{solo}");
    let list = run(&["schedules"]);
    assert!(list.contains("(trigger, 2 jobs)"), "{list}");
    assert!(list.contains("(trigger, 1 job)"), "{list}");

    // Pause and resume, as the list shows them.
    assert_eq!(run(&["schedules", "pause", "solo"]), "paused solo\n");
    assert!(run(&["schedules"]).contains("solo  paused"));
    assert_eq!(run(&["schedules", "resume", "solo"]), "resumed solo\n");
    assert!(run(&["schedules"]).contains("solo  active"));

    // Backfills: both ends are included; a slot's job has the schedule's own id for it.
    let backfill = |from: &str, to: &str, json: bool| {
        let mut args = vec!["schedules", "backfill", "solo", "--from", from, "--to", to];
        if json {
            args.insert(0, "--json");
        }
        run(&args)
    };
    let (midnight, one, two) = (
        "2026-01-01T00:00:00Z",
        "2026-01-01T01:00:00Z",
        "2026-01-01T02:00:00Z",
    );
    assert_eq!(
        backfill(midnight, two, false),
        "backfilled solo: 3 slots, 3 jobs\n"
    );
    assert_eq!(
        backfill(midnight, "2026-01-01T00:30:00Z", false),
        "backfilled solo: 1 slot, 1 job\n"
    );
    let out: Value = serde_json::from_str(&backfill(one, one, true)).expect("JSON");
    let slot_ms = 1_767_229_200_000; // 2026-01-01T01:00:00Z
    assert_eq!(
        out["slots"][0]["jobs"][0],
        json!(JobId::for_slot("solo", slot_ms, "ops").to_string()),
        "{out}"
    );
}

fn job_ids(out: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(out).expect("JSON");
    v["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .map(|id| id.as_str().expect("an id").to_string())
        .collect()
}
