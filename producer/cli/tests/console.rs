//! `warren console` in a real browser (Debian's chromium, driven through chromedriver with
//! fantoccini), against the real broker and a worker in this process: find a tenant's failed
//! job, read its error, replay it once the step is fixed, see it succeed; a `<script>` in a
//! payload and in an error shows as text; the overview lists the worker while it runs, and not
//! once it stopped. Plus the console's guards, over plain HTTP.
//!
//! With `WARREN_CONSOLE_SCREENSHOTS=<folder>` the browser test saves a screenshot of each page
//! there (how docs/console/*.png are made).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use fantoccini::{ClientBuilder, Locator};
use serde_json::{json, Value};
use warren_producer::{Job, JobId, JobStatus};
use warren_tests::{eventually, InProcessWorker, TestNamespace};
use warren_worker::Worker;

mod support;

use support::{health, Killed};

const WARREN: &str = env!("CARGO_BIN_EXE_warren");

/// A one-step pipeline whose command step fails for good (exit 65) for tenant `acme` while the
/// file the payload names as `flag` is missing, with a `<script>` in its stderr.
const IMPORT: &str = r#"
[history]
enabled = true
retention = "1h"

[[pipelines]]
name = "import"
shards = 2

[[pipelines.steps]]
name = "load"
max_attempts = 2
backoff = ["100ms"]
command = ["python3", "-c", '''
import json, os, sys
job = json.load(sys.stdin)
if os.environ["WARREN_TENANT"] == "acme" and not os.path.exists(job["flag"]):
    sys.stderr.write("<script>window.pwned = 1</script> cannot load " + job["note"] + ": the flag file is missing\n")
    sys.exit(65)
json.dump({"loaded": job["note"], "rows": 42}, sys.stdout)
''']

[[schedules]]
name = "nightly"
pipeline = "import"
cron = "0 3 * * *"
tenants = ["globex", "initech"]
payload = { flag = "/nonexistent", note = "nightly" }
"#;

/// What the error of acme's job says (the script tag must show as text).
const SCRIPT_ERROR: &str = "<script>window.pwned = 1</script> cannot load";

/// Starts `warren console` on the namespace; returns it and its URL.
fn start_console(ns: &TestNamespace) -> (Killed, String) {
    support::start_console(WARREN, &ns.config_path)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// chromedriver on a free port, once it answers.
async fn start_chromedriver() -> (Killed, String) {
    let driver = ["chromedriver", "/usr/bin/chromedriver"]
        .into_iter()
        .find(|d| Command::new(d).arg("--version").output().is_ok())
        .expect("chromedriver not found: run deploy/local/test.sh, or apt-get install chromium chromium-driver");
    let port = free_port();
    let child = Command::new(driver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let status = format!("{url}/status");
    let up = eventually(Duration::from_secs(30), || {
        let status = status.clone();
        async move { reqwest::get(&status).await.is_ok() }
    })
    .await;
    assert!(up, "chromedriver did not answer on {url}");
    (Killed(child), url)
}

/// A headless chromium with a fresh profile, and no network but the console's.
async fn browser(driver: &str, profile: &Path) -> fantoccini::Client {
    let args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
    ]
    .into_iter()
    .map(String::from)
    .chain([format!("--user-data-dir={}", profile.display())])
    .collect::<Vec<_>>();
    let mut caps = serde_json::Map::new();
    caps.insert("goog:chromeOptions".into(), json!({ "args": args }));
    ClientBuilder::rustls()
        .unwrap()
        .capabilities(caps)
        .connect(driver)
        .await
        .expect("a chromium session")
}

/// Saves a screenshot of the page as `<name>.png` when `WARREN_CONSOLE_SCREENSHOTS` names a
/// folder.
async fn screenshot(browser: &fantoccini::Client, name: &str) {
    if let Ok(dir) = std::env::var("WARREN_CONSOLE_SCREENSHOTS") {
        let png = browser.screenshot().await.unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(PathBuf::from(dir).join(format!("{name}.png")), png).unwrap();
    }
}

/// The text of `css` once it is there. Live updates replace elements, so a read that finds its
/// element gone (stale) looks it up again.
async fn text_of(browser: &fantoccini::Client, css: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let found = browser.find(Locator::Css(css)).await;
        let error = match found {
            Ok(element) => match element.text().await {
                Ok(text) => return text,
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        assert!(tokio::time::Instant::now() < deadline, "{css}: {error}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Clicks `css`, looking it up again if a live update replaced it between the find and the click.
async fn click(browser: &fantoccini::Client, css: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let found = browser.find(Locator::Css(css)).await;
        let error = match found {
            Ok(element) => match element.click().await {
                Ok(_) => return,
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        assert!(
            tokio::time::Instant::now() < deadline,
            "click {css}: {error}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the page a form led to shows a flash message holding `want`. The click can return
/// before the browser has left the old page, whose flash may be the previous action's.
async fn expect_flash(browser: &fantoccini::Client, want: &str) {
    if !wait_text(browser, "#flash", want).await {
        panic!(
            "flash {want:?}, read {:?}",
            text_of(browser, "#flash").await
        );
    }
}

/// Waits (the page's live updates, no reload) until `css` holds `want`.
async fn wait_text(browser: &fantoccini::Client, css: &str, want: &str) -> bool {
    eventually(Duration::from_secs(45), || async {
        match browser.find(Locator::Css(css)).await {
            Ok(element) => element.text().await.is_ok_and(|t| t.contains(want)),
            Err(_) => false,
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_a_tenants_failed_job_read_why_replay_it_and_see_it_succeed() {
    // Given a worker, jobs of three tenants, and acme's failing for good until the flag appears
    let ns = TestNamespace::new(IMPORT).await;
    let worker = Worker::builder(ns.config.clone())
        .shutdown_grace(Duration::from_millis(100))
        .build()
        .unwrap();
    let worker = InProcessWorker::start(worker);
    let client = ns.client().await;
    let flag = ns.dir.join("flag");
    let note = "<script>window.pwned = 2</script>catalogue.csv";
    let mut ids = Vec::new();
    for tenant in ["globex", "initech", "acme", "globex", "initech"] {
        let job = Job::new(
            "import",
            tenant,
            json!({"flag": flag, "note": format!("{tenant} {note}")}),
        );
        ids.push((tenant, client.submit(job).await.unwrap()));
    }
    let failed: JobId = ids.iter().find(|(t, _)| *t == "acme").unwrap().1;
    let result = client.wait(failed, Duration::from_secs(30)).await.unwrap();
    assert_eq!(result.status, JobStatus::Failed, "{result:?}");

    // When the console runs and a browser opens acme's failures
    let (_console, url) = start_console(&ns);
    let (_driver, driver_url) = start_chromedriver().await;
    let profile = ns.dir.join("chromium-profile");
    let browser = browser(&driver_url, &profile).await;
    browser
        .goto(&format!("{url}/failures?tenant=acme"))
        .await
        .unwrap();
    let row = format!("tr[data-job=\"{failed}\"]");
    let listed = wait_text(&browser, &row, "dead_lettered").await;
    assert!(listed, "{}", browser.source().await.unwrap());
    screenshot(&browser, "failures").await;

    // Then the job page says why, with the script tags as text
    click(&browser, &format!("{row} a[href=\"/jobs/{failed}\"]")).await;
    let error = text_of(&browser, "#job-error").await;
    assert!(error.contains(SCRIPT_ERROR), "{error}");
    assert!(error.contains("the flag file is missing"), "{error}");
    let timeline = text_of(&browser, "#timeline").await;
    assert!(
        timeline.contains("load") && timeline.contains("failed"),
        "{timeline}"
    );
    let pwned = browser
        .execute("return window.pwned === undefined;", vec![])
        .await
        .unwrap();
    assert_eq!(
        pwned,
        Value::Bool(true),
        "a script from the error or payload ran"
    );
    screenshot(&browser, "job-failed").await;

    // When the step is fixed and Replay is pressed
    std::fs::write(&flag, b"").unwrap();
    click(&browser, "#replay").await;
    expect_flash(&browser, "replayed 1").await;

    // Then the page shows it succeed, without a reload, with its output
    let succeeded = wait_text(&browser, "#job-status", "succeeded").await;
    assert!(succeeded, "{}", browser.source().await.unwrap());
    browser.refresh().await.unwrap();
    let output = text_of(&browser, "#job-output").await;
    assert!(
        output.contains("acme <script>window.pwned = 2</script>catalogue.csv"),
        "{output}"
    );
    let timeline = text_of(&browser, "#timeline").await;
    assert!(timeline.contains("succeeded"), "{timeline}");
    screenshot(&browser, "job").await;

    // When another of acme's jobs fails, and it is ticked and purged with the confirmation
    std::fs::remove_file(&flag).unwrap();
    let doomed = client
        .submit(Job::new(
            "import",
            "acme",
            json!({"flag": flag, "note": "second"}),
        ))
        .await
        .unwrap();
    let result = client.wait(doomed, Duration::from_secs(30)).await.unwrap();
    assert_eq!(result.status, JobStatus::Failed, "{result:?}");
    browser
        .goto(&format!("{url}/failures?tenant=acme"))
        .await
        .unwrap();
    let doomed_row = format!("tr[data-job=\"{doomed}\"]");
    assert!(wait_text(&browser, &doomed_row, "dead_lettered").await);
    assert!(wait_text(&browser, "#live #dead-letters", "1").await);
    let tick = format!("{doomed_row} input[type=checkbox]");
    click(&browser, &tick).await;
    let confirm = "#selected input[name=confirm]";
    browser
        .find(Locator::Css(confirm))
        .await
        .unwrap()
        .send_keys("purge")
        .await
        .unwrap();
    let purge = "#selected button[formaction=\"/failures/purge\"]";
    click(&browser, purge).await;
    browser.accept_alert().await.unwrap();

    // Then it is gone from the dead-letter queue, and the replayed job was not touched
    expect_flash(&browser, "purged 1").await;
    assert!(wait_text(&browser, "#live #dead-letters", "0").await);
    assert!(client
        .dlq_list(&Default::default())
        .await
        .unwrap()
        .is_empty());

    // And every page renders what happened, the tenant's payload as text
    browser
        .goto(&format!("{url}/jobs?tenant=acme"))
        .await
        .unwrap();
    assert!(wait_text(&browser, &row, "succeeded").await);
    screenshot(&browser, "jobs").await;
    browser.goto(&format!("{url}/tenants")).await.unwrap();
    let tenants = text_of(&browser, "#tenants").await;
    for tenant in ["acme", "globex", "initech"] {
        assert!(tenants.contains(tenant), "{tenants}");
    }
    screenshot(&browser, "tenants").await;
    browser.goto(&format!("{url}/")).await.unwrap();
    assert!(wait_text(&browser, "#dead-letters", "0").await);
    // The worker in this process is listed, from its presence reports.
    assert!(wait_text(&browser, "#live #workers", "1").await);
    assert_eq!(text_of(&browser, "#workers").await, "1");
    let workers = text_of(&browser, "#worker-list").await;
    let pid = std::process::id().to_string();
    assert!(
        workers.contains(&pid) && workers.contains("import") && workers.contains("serving"),
        "{workers}"
    );
    screenshot(&browser, "overview").await;
    let api: Value = reqwest::get(format!("{url}/api/overview"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let listed = &api["page"]["workers"];
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{api}");
    assert_eq!(listed[0]["pid"], json!(std::process::id()), "{api}");
    assert_eq!(listed[0]["steps"], json!(["import/load"]), "{api}");
    browser.goto(&format!("{url}/schedules")).await.unwrap();
    assert!(wait_text(&browser, "#schedules", "nightly").await);
    let pause = "#schedules button";
    click(&browser, pause).await;
    expect_flash(&browser, "paused nightly").await;
    assert!(wait_text(&browser, "#schedules", "paused").await);
    click(&browser, pause).await;
    expect_flash(&browser, "resumed nightly").await;
    assert!(wait_text(&browser, "#schedules", "active").await);
    screenshot(&browser, "schedules").await;
    let pwned = browser
        .execute("return window.pwned === undefined;", vec![])
        .await
        .unwrap();
    assert_eq!(pwned, Value::Bool(true));

    // When the worker stops, the overview no longer lists it, without a reload
    browser.goto(&format!("{url}/")).await.unwrap();
    assert!(wait_text(&browser, "#live #workers", "1").await);
    worker.stop().await;
    assert!(wait_text(&browser, "#live #workers", "0").await);

    browser.close().await.unwrap();
    client.close().await;
}

#[tokio::test]
async fn state_changes_need_the_forms_token_and_another_address_needs_credentials() {
    // Given a console on a namespace with history
    let ns = TestNamespace::new(IMPORT).await;
    let (_console, url) = start_console(&ns);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let ready = eventually(Duration::from_secs(30), || async {
        health(&http, &url)
            .await
            .is_some_and(|h| h["ready"] == json!(true))
    })
    .await;
    assert!(ready);

    // When a replay is posted without the form's token, or from another site
    let forged = http
        .post(format!("{url}/failures/replay"))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body("id=x&csrf=guess")
        .send()
        .await
        .unwrap();
    let page = http.get(format!("{url}/failures")).send().await.unwrap();
    let html = page.text().await.unwrap();
    let token = html
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a csrf field")
        .to_string();
    let elsewhere = http
        .post(format!("{url}/failures/replay"))
        .header("Origin", "http://evil.example")
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(format!("id=x&csrf={token}"))
        .send()
        .await
        .unwrap();
    let rebound = http
        .get(format!("{url}/api/overview"))
        .header("Host", "evil.example")
        .send()
        .await
        .unwrap();

    // Then each is refused
    assert_eq!(forged.status(), 403);
    assert_eq!(elsewhere.status(), 403);
    assert_eq!(rebound.status(), 401);

    // And another address without credentials does not start, naming what to set
    let refused = Command::new(WARREN)
        .arg("--config")
        .arg(&ns.config_path)
        .args(["console", "--listen", "0.0.0.0:0"])
        .env_remove("WARREN_CONSOLE_TOKEN")
        .env_remove("WARREN_CONSOLE_BASIC_AUTH")
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("WARREN_CONSOLE_TOKEN"), "{stderr}");
}
