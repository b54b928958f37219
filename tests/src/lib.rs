//! Helpers for warren's integration tests: a throw-away namespace on the real broker (deleted on
//! drop), worker processes to start and kill, result collection, and a broker that never
//! answers ([`SilentBroker`]).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures::StreamExt;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use warren_broker::{Broker, Topology};
use warren_producer::{Client, Config, JobId, ResultEvent, Since};

mod silent;
pub use silent::SilentBroker;

/// Env var through which the test worker's `work` handler learns where to write its markers.
pub const ENV_TEST_DIR: &str = "WARREN_TEST_DIR";

/// A namespace of its own on the real broker, with its config file in a temp folder.
/// Dropping it deletes every queue and exchange it declared, and the folder.
#[derive(Debug)]
pub struct TestNamespace {
    pub name: String,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub config: Config,
}

impl TestNamespace {
    /// `pipelines` is the TOML after `[broker]`; the namespace is made up here, and its
    /// topology declared.
    pub async fn new(pipelines: &str) -> Self {
        let ns = Self::undeclared(pipelines);
        ns.declare().await;
        ns
    }

    /// Declares the namespace's topology.
    pub async fn declare(&self) {
        let broker = Broker::connect(&self.config.broker)
            .await
            .expect("broker (is RabbitMQ up?)");
        Topology::plan(&self.config)
            .declare(&broker)
            .await
            .expect("declare topology");
        broker.close().await;
    }

    /// A namespace whose topology is not declared yet (a test declares it, or checks what
    /// happens without it). Dropping it deletes whatever was declared.
    pub fn undeclared(pipelines: &str) -> Self {
        let urls: Vec<String> = std::env::var("WARREN_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
            .split(',')
            .map(|u| u.trim().to_string())
            .collect();
        Self::undeclared_on(&urls, pipelines)
    }

    /// A namespace on the broker (or the cluster's members) `urls`, declared.
    pub async fn new_on(urls: &[String], pipelines: &str) -> Self {
        let ns = Self::undeclared_on(urls, pipelines);
        ns.declare().await;
        ns
    }

    fn undeclared_on(urls: &[String], pipelines: &str) -> Self {
        let name = format!("wt-{:08x}", rand::random::<u32>());
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(dir.join("markers")).expect("temp dir");
        let text = format!("[broker]\nurls = {urls:?}\nnamespace = {name:?}\n\n{pipelines}");
        let config_path = dir.join("warren.toml");
        std::fs::write(&config_path, &text).expect("write config");
        let config = Config::load(Some(&config_path), &HashMap::new()).expect("test config");
        Self {
            name,
            dir,
            config_path,
            config,
        }
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.config.clone()).await.expect("client")
    }

    pub async fn broker(&self) -> Broker {
        Broker::connect(&self.config.broker).await.expect("broker")
    }

    /// Ready messages in every queue of the namespace that holds work or dead letters (step
    /// queues, delay queues, the dead-letter queue), by name; a missing queue counts as empty.
    pub async fn work_queue_depths(&self) -> Vec<(String, u32)> {
        let broker = self.broker().await;
        let mut depths = Vec::new();
        for queue in Topology::plan(&self.config).work_queues() {
            let depth = warren_broker::depth::ready_messages(&broker, &queue.name)
                .await
                .expect("queue depth");
            depths.push((queue.name.clone(), depth.unwrap_or(0)));
        }
        broker.close().await;
        depths
    }

    /// Messages delivered and not yet acked, per queue of the namespace that has any, from the
    /// management API (refreshed every 5 s by the broker): with [`Self::work_queue_depths`],
    /// tells a message held by a worker from a lost one. The error as text when the API is off.
    pub async fn unacked(&self) -> Result<Vec<(String, u64)>, String> {
        let mut config = self.config.broker.clone();
        config.management_url = Some(management_url());
        let management = warren_broker::Management::from_config(&config)
            .map_err(|e| e.to_string())?
            .ok_or("no management URL")?;
        let unacked = management
            .unacked(&format!("{}.", self.name))
            .await
            .map_err(|e| e.to_string())?;
        let mut held: Vec<_> = unacked.into_iter().filter(|(_, n)| *n > 0).collect();
        held.sort();
        Ok(held)
    }

    /// Closes, from the broker's side (the management API), every connection of this
    /// namespace's processes that the broker lists once at least `at_least` are listed (the
    /// list lags new connections by up to its stats interval, 5 s): a broker restart, for
    /// this namespace alone. Returns how many were closed.
    pub async fn close_connections(&self, at_least: usize) -> usize {
        let http = reqwest::Client::new();
        let base = reqwest::Url::parse(&management_url()).expect("management URL");
        let mine = warren_broker::connection_name(&self.name);
        let list = || async {
            let mut url = base.clone();
            url.set_path("/api/connections");
            url.set_query(Some("columns=name,client_properties"));
            let listed: Vec<serde_json::Value> = http
                .get(url)
                .basic_auth("guest", Some("guest"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let names: Vec<String> = listed
                .iter()
                .filter(|c| c["client_properties"]["connection_name"] == mine.as_str())
                .filter_map(|c| c["name"].as_str().map(str::to_owned))
                .collect();
            Some(names)
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let names = loop {
            let names = list().await.unwrap_or_default();
            if names.len() >= at_least {
                break names;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the broker listed {} connections of {}",
                names.len(),
                self.name
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        for name in &names {
            let mut url = base.clone();
            url.path_segments_mut()
                .expect("base URL")
                .extend(["api", "connections", name]);
            http.delete(url)
                .basic_auth("guest", Some("guest"))
                .header("X-Reason", "a test closes its namespace's connections")
                .send()
                .await
                .expect("close a connection");
        }
        names.len()
    }

    /// Starts the test worker binary (`test-worker run`) on this namespace's config.
    pub fn spawn_worker(&self, extra: &[&str]) -> WorkerProcess {
        self.spawn_worker_with_config(&self.config_path, extra)
    }

    /// Starts the test worker on another config file (one that reaches the broker another
    /// way); its log goes to this namespace's folder all the same.
    pub fn spawn_worker_with_config(&self, config: &Path, extra: &[&str]) -> WorkerProcess {
        self.spawn_test_worker("run", config, extra)
    }

    /// Starts `test-worker supervise --config <this namespace's config> <extra>`; the
    /// supervisor's log (with its workers' lines, prefixed) goes to this namespace's folder.
    pub fn spawn_supervisor(&self, extra: &[&str]) -> WorkerProcess {
        self.spawn_test_worker("supervise", &self.config_path, extra)
    }

    fn spawn_test_worker(&self, subcommand: &str, config: &Path, extra: &[&str]) -> WorkerProcess {
        let n = std::fs::read_dir(&self.dir).map(|d| d.count()).unwrap_or(0);
        let stem = if subcommand == "run" {
            "worker"
        } else {
            subcommand
        };
        let log = self.dir.join(format!("{stem}-{n}.log"));
        let child = Command::new(test_worker_bin())
            .arg(subcommand)
            .arg("--config")
            .arg(config)
            .args(extra)
            .env_remove("WARREN_AMQP_URL")
            // Backlogs are the ready messages alone unless a test asks for unacked counts too.
            .env_remove("WARREN_MANAGEMENT_URL")
            // Any free port: tests run many workers at once. A test that wants to scrape a
            // worker passes --metrics-addr itself.
            .env("WARREN_METRICS_ADDR", "127.0.0.1:0")
            .env(ENV_TEST_DIR, self.markers())
            .env("WARREN_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start test-worker");
        WorkerProcess { child, log }
    }

    /// Where the `work` handler writes one file per step start.
    pub fn markers(&self) -> PathBuf {
        self.dir.join("markers")
    }

    /// Step starts recorded by the `work` handler: (job id, step, started at ms).
    pub fn step_starts(&self) -> Vec<(String, String, u64)> {
        self.step_starts_with_attempts()
            .into_iter()
            .map(|s| (s.job, s.step, s.at_ms))
            .collect()
    }

    /// Step starts recorded by the `work` handler, with the attempt each one was.
    pub fn step_starts_with_attempts(&self) -> Vec<StepStart> {
        let mut starts = Vec::new();
        for entry in std::fs::read_dir(self.markers())
            .expect("markers")
            .flatten()
        {
            // `<job>.<step>.<attempt>.<unique>`, written by tests/src/bin/test-worker.rs.
            let name = entry.file_name().to_string_lossy().into_owned();
            let mut parts = name.split('.');
            let (Some(job), Some(step), Some(attempt)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let at_ms = std::fs::read_to_string(entry.path())
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(0);
            starts.push(StepStart {
                job: job.to_string(),
                step: step.to_string(),
                attempt: attempt.parse().unwrap_or(0),
                at_ms,
            });
        }
        starts
    }
}

/// One start of a step, as the test worker's `work` handler recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepStart {
    pub job: String,
    pub step: String,
    pub attempt: u32,
    pub at_ms: u64,
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let config = self.config.clone();
        // Drop cannot be async, and we may be inside a runtime: clean up from a thread of its own.
        let cleaned = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let broker = Broker::connect(&config.broker).await?;
                Topology::plan(&config).delete(&broker).await
            })
            .map_err(|e| std::io::Error::other(e.to_string()))
        })
        .join();
        if !matches!(cleaned, Ok(Ok(()))) {
            eprintln!("could not delete test namespace {}: {cleaned:?}", self.name);
        }
        if std::thread::panicking() {
            eprintln!(
                "test namespace {} failed; worker logs kept in {}",
                self.name,
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The `test-worker` binary cargo built next to the running test binary
/// (`target/<profile>/deps/e2e-*` -> `target/<profile>/test-worker`).
pub fn test_worker_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    profile_dir.join("test-worker")
}

/// A worker process; killed when dropped.
#[derive(Debug)]
pub struct WorkerProcess {
    child: Child,
    pub log: PathBuf,
}

impl WorkerProcess {
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL: no chance to clean up, as in a crash or an OOM kill.
    pub fn kill_hard(&mut self) {
        let _ = kill(self.pid(), Signal::SIGKILL);
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits up to `patience` for the exit code.
    pub fn terminate(&mut self, patience: Duration) -> Option<i32> {
        let _ = kill(self.pid(), Signal::SIGTERM);
        self.wait_exit(patience)
    }

    /// Waits up to `patience` for the process to exit; its exit code, or `None` if it runs on.
    pub fn wait_exit(&mut self, patience: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + patience;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill_hard();
        }
    }
}

/// Every result event for `ids` (duplicates included, in arrival order): waits (through the
/// SDK's [`Client::wait_all`]) until each id has its final result or `timeout` passes, then
/// reads the stream again from the jobs' time until it goes quiet, so tests can count repeats.
pub async fn collect_results(
    client: &Client,
    ids: &[JobId],
    timeout: Duration,
) -> HashMap<JobId, Vec<ResultEvent>> {
    let mut waiting = client.wait_all(ids, timeout).await.expect("results");
    let mut settled = HashSet::new();
    // A timeout leaves the jobs without a result out; the test says what it expected.
    while let Ok(Some(event)) = waiting.next().await {
        settled.insert(event.job_id);
    }
    waiting.close().await;
    let wanted: HashSet<JobId> = ids.iter().copied().collect();
    let earliest = ids.iter().min_by_key(|id| id.timestamp_ms());
    let mut stream = client
        .results(earliest.map_or(Since::Now, |id| Since::Job(*id)))
        .await
        .expect("results");
    let mut found: HashMap<JobId, Vec<ResultEvent>> = HashMap::new();
    loop {
        // Until the results the wait saw are read again; then late repeats get a moment.
        let all_again = settled.iter().all(|id| found.contains_key(id));
        let patience = Duration::from_millis(if all_again { 200 } else { 10_000 });
        let Ok(Some(Ok(event))) = tokio::time::timeout(patience, stream.next()).await else {
            break;
        };
        if wanted.contains(&event.job_id) {
            found.entry(event.job_id).or_default().push(event);
        }
    }
    stream.close().await;
    found
}

/// A worker running on this test's runtime (with the handlers the test registered), until
/// [`InProcessWorker::stop`].
#[derive(Debug)]
pub struct InProcessWorker {
    stop: tokio::sync::oneshot::Sender<()>,
    join: tokio::task::JoinHandle<Result<(), warren_worker::WorkerError>>,
}

impl InProcessWorker {
    pub fn start(worker: warren_worker::Worker) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let join = tokio::spawn(worker.run(async move {
            let _ = stopped.await;
        }));
        Self { stop, join }
    }

    /// Stops it and waits for it to end cleanly.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.join.await.expect("worker task").expect("worker run");
    }
}

/// GET `path` (with its query, already encoded) from `127.0.0.1:port`: (status, body), or
/// `None` when nothing answers.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let response = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}{path}"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

/// The management API of the test broker: `WARREN_MANAGEMENT_URL`, else the local one that
/// `deploy/local/test.sh` enables.
pub fn management_url() -> String {
    std::env::var("WARREN_MANAGEMENT_URL").unwrap_or_else(|_| "http://127.0.0.1:15672".into())
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes; returns whether it held.
pub async fn eventually<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
