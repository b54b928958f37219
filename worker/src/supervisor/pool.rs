//! A pool's worker processes: start them (this same executable, `run --pipeline P [--step S]`),
//! drain them with SIGTERM, collect the ones that exited, and relay their output.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tracing::{debug, info, warn};
use warren_broker::depth::QueueDepth;
use warren_common::env::{ENV_WARREN_METRICS_ADDR, ENV_WARREN_SUPERVISOR_PID};
use warren_common::telemetry::LogFormat;

use super::options::{Options, PoolSpec};
use super::policy::{Action, Policy, Sizing};
use crate::metrics::SupervisorMetrics;

/// Extra time a draining worker gets beyond its shutdown grace before it is killed.
const DRAIN_MARGIN: Duration = Duration::from_secs(10);

/// The slots in use across every pool. A worker's slot places its metrics port
/// (`--worker-metrics-base` + slot) and prefixes its output lines.
#[derive(Debug, Default)]
pub(crate) struct Slots(BTreeSet<usize>);

impl Slots {
    /// The lowest free slot, now taken.
    fn take(&mut self) -> usize {
        let slot = (0..).find(|s| !self.0.contains(s)).unwrap_or(0);
        self.0.insert(slot);
        slot
    }

    fn free(&mut self, slot: usize) {
        self.0.remove(&slot);
    }
}

#[derive(Debug)]
struct WorkerChild {
    slot: usize,
    pid: u32,
    started: Instant,
    child: Child,
    /// When it was sent SIGTERM.
    draining: Option<Instant>,
}

impl WorkerChild {
    fn signal(&self, signal: Signal) {
        let _ = kill(Pid::from_raw(self.pid as i32), signal);
    }
}

#[derive(Debug)]
pub(crate) struct Pool {
    spec: PoolSpec,
    /// Indices of its queues in the supervisor's queue list.
    queues: Vec<usize>,
    children: Vec<WorkerChild>,
    sizing: Sizing,
    /// What the last info-level decision line said, to log changes and not every tick.
    last_logged: Option<(u32, u32, Action)>,
}

impl Pool {
    /// A pool with no worker yet. `queues` are the indices of its queues in the list whose
    /// depths [`Pool::backlog`] will be given.
    pub(crate) fn new(spec: PoolSpec, queues: Vec<usize>, policy: &Policy) -> Self {
        Self {
            spec,
            queues,
            children: Vec::new(),
            sizing: Sizing::new(policy),
            last_logged: None,
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.spec.name
    }

    /// The pool's share of one depth read.
    pub(crate) fn backlog(&self, depths: &[QueueDepth]) -> u64 {
        self.queues.iter().map(|i| depths[*i].backlog()).sum()
    }

    /// Workers alive and not draining.
    pub(crate) fn running(&self) -> u32 {
        self.children
            .iter()
            .filter(|c| c.draining.is_none())
            .count() as u32
    }

    /// Workers alive, draining or not.
    pub(crate) fn alive(&self) -> usize {
        self.children.len()
    }

    /// Collects the workers that exited. One that was not told to stop is a crash: counted, and
    /// started again by the scaling that follows (after a backoff if it keeps dying at start).
    /// One draining past its grace is killed.
    pub(crate) fn reap(
        &mut self,
        now: Instant,
        grace: Duration,
        slots: &mut Slots,
        metrics: &SupervisorMetrics,
    ) {
        let mut k = 0;
        while k < self.children.len() {
            let c = &mut self.children[k];
            let status = match c.child.try_wait() {
                Ok(Some(status)) => status,
                Ok(None) => {
                    if c.draining
                        .is_some_and(|since| now - since > grace + DRAIN_MARGIN)
                    {
                        warn!(pool = %self.spec.name, pid = c.pid, "Worker still draining past its grace; killing it.");
                        let _ = c.child.start_kill();
                    }
                    k += 1;
                    continue;
                }
                Err(e) => {
                    warn!(pool = %self.spec.name, pid = c.pid, error = %e, "Cannot check a worker.");
                    k += 1;
                    continue;
                }
            };
            let c = self.children.swap_remove(k);
            slots.free(c.slot);
            if c.draining.is_some() {
                info!(pool = %self.spec.name, pid = c.pid, slot = c.slot, status = %status, "Worker drained and exited.");
                continue;
            }
            metrics.restarted(&self.spec.name);
            let lived = now - c.started;
            self.sizing.crashed(lived, now);
            warn!(
                pool = %self.spec.name, pid = c.pid, slot = c.slot, status = %status,
                lived = ?lived, "Worker exited unexpectedly; starting another."
            );
        }
    }

    /// Decides this tick's size (see [`Sizing::tick`]) and gets there: starts workers, or
    /// drains the newest.
    pub(crate) fn scale(
        &mut self,
        backlog: Option<u64>,
        now: Instant,
        options: &Options,
        slots: &mut Slots,
        metrics: &SupervisorMetrics,
    ) {
        let running = self.running();
        let (decision, action) = self.sizing.tick(&options.policy, backlog, running, now);
        let name = self.spec.name.as_str();
        let logged = (decision.desired, running, action);
        if self.last_logged != Some(logged) {
            info!(
                pool = %name, backlog = backlog.map_or(-1, |b| b as i64),
                desired = decision.desired, running, scale_to = decision.target,
                action = action.as_str(), "Scaling decision."
            );
            self.last_logged = Some(logged);
        } else {
            debug!(pool = %name, backlog = ?backlog, desired = decision.desired, running, action = action.as_str(), "Scaling decision.");
        }
        metrics.desired(name, decision.desired);
        match action {
            Action::ScaleUp => {
                for _ in running..decision.target {
                    if let Err(e) = self.start(options, slots) {
                        warn!(pool = %self.spec.name, error = %e, "Cannot start a worker.");
                        self.sizing.start_failed(now);
                        break;
                    }
                }
            }
            Action::ScaleDown => self.drain(running - decision.target, now),
            Action::Hold | Action::WaitRestartBackoff | Action::Steady => {}
        }
        metrics.running(&self.spec.name, self.running());
    }

    /// Starts one worker in the lowest free slot.
    fn start(&mut self, options: &Options, slots: &mut Slots) -> std::io::Result<()> {
        let slot = slots.take();
        let metrics_addr = options.worker_metrics.addr(slot);
        let mut cmd = Command::new(&options.exe);
        cmd.arg("run");
        if let Some(path) = &options.config_path {
            cmd.arg("--config").arg(path);
        }
        cmd.arg("--pipeline").arg(&self.spec.pipeline);
        if let Some(step) = &self.spec.step {
            cmd.arg("--step").arg(step);
        }
        cmd.arg("--shutdown-grace")
            .arg(humantime::format_duration(options.shutdown_grace).to_string())
            .arg("--log-format")
            .arg(match options.log_format {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            })
            .env(ENV_WARREN_METRICS_ADDR, &metrics_addr)
            .env(ENV_WARREN_SUPERVISOR_PID, std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a Ctrl-C in the terminal reaches only the supervisor,
            // which then drains each worker with one SIGTERM (a second would stop it at once).
            .process_group(0)
            .kill_on_drop(false);
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                slots.free(slot);
                return Err(e);
            }
        };
        let pid = child.id().unwrap_or(0);
        let prefix = format!("{}#{slot}", self.spec.name);
        if let Some(out) = child.stdout.take() {
            tokio::spawn(relay(out, prefix.clone()));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(relay(err, prefix));
        }
        info!(pool = %self.spec.name, pid, slot, metrics = %metrics_addr, "Started a worker.");
        self.children.push(WorkerChild {
            slot,
            pid,
            started: Instant::now(),
            child,
            draining: None,
        });
        Ok(())
    }

    /// Sends SIGTERM to `n` workers, the newest first: the oldest have warm caches and
    /// long-running steps.
    fn drain(&mut self, n: u32, now: Instant) {
        self.children.sort_by_key(|c| c.started);
        let mut to_drain = n;
        for c in self.children.iter_mut().rev() {
            if to_drain == 0 {
                break;
            }
            if c.draining.is_none() {
                c.signal(Signal::SIGTERM);
                c.draining = Some(now);
                to_drain -= 1;
                info!(pool = %self.spec.name, pid = c.pid, slot = c.slot, "Draining a worker (SIGTERM).");
            }
        }
    }

    /// Sends SIGTERM to every worker not draining yet.
    pub(crate) fn drain_all(&mut self, now: Instant) {
        for c in self.children.iter_mut().filter(|c| c.draining.is_none()) {
            c.signal(Signal::SIGTERM);
            c.draining = Some(now);
        }
    }

    /// Sends every worker a second SIGTERM, which makes a worker exit at once.
    pub(crate) fn stop_now(&self) {
        self.children.iter().for_each(|c| c.signal(Signal::SIGTERM));
    }
}

/// Copies a worker's output lines to our stderr, each prefixed with `pool#slot | `.
async fn relay(stream: impl AsyncRead + Unpin, prefix: String) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        // Not eprintln!: a closed stderr must not panic the relay.
        let _ = writeln!(std::io::stderr().lock(), "{prefix} | {line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_the_lowest_free_ones() {
        let mut slots = Slots::default();
        assert_eq!([slots.take(), slots.take(), slots.take()], [0, 1, 2]);
        slots.free(1);
        assert_eq!(slots.take(), 1);
        assert_eq!(slots.take(), 3);
    }
}
