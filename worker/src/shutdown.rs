//! Process signals. Kubernetes (and the supervisor) stop a worker with SIGTERM and wait its grace
//! period before SIGKILL; a terminal sends SIGINT. Either starts a graceful drain; a second one
//! exits at once (unacked deliveries return to their queues either way).

use tokio::signal::unix::{signal as unix_signal, Signal, SignalKind};

/// SIGTERM and SIGINT handlers. Install them before doing anything slow: until they exist, a
/// SIGTERM gets the default action and kills the process mid-start instead of draining it.
#[derive(Debug)]
pub struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    /// Registers the handlers now. Must run inside a tokio runtime.
    pub fn install() -> Self {
        Self {
            term: unix_signal(SignalKind::terminate()).expect("SIGTERM handler"),
            int: unix_signal(SignalKind::interrupt()).expect("SIGINT handler"),
        }
    }

    /// Resolves on the first SIGTERM or SIGINT (also one that came before this was awaited); a
    /// second one exits the process immediately.
    pub async fn recv(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
        tracing::info!("Shutdown requested; send the signal again to stop at once.");
        tokio::spawn(async move {
            tokio::select! {
                _ = self.term.recv() => {}
                _ = self.int.recv() => {}
            }
            tracing::warn!("Second signal: exiting now; unfinished steps return to their queues.");
            std::process::exit(130);
        });
    }
}

/// Env var through which the supervisor tells its workers its pid.
pub const ENV_SUPERVISOR_PID: &str = "WARREN_SUPERVISOR_PID";

/// Resolves once this process's parent is no longer `parent` (it died, even by SIGKILL, and the
/// process was handed to init), so a supervised worker drains instead of running on unwatched.
/// Polls once a second: Linux's parent-death signal needs `unsafe` in `pre_exec`.
pub async fn parent_gone(parent: u32) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        every.tick().await;
        let now = nix::unistd::getppid().as_raw();
        if u32::try_from(now).ok() != Some(parent) {
            tracing::warn!(
                supervisor_pid = parent,
                "The supervisor is gone; draining and exiting."
            );
            return;
        }
    }
}

/// Installs the handlers and waits for the first signal.
pub async fn signal() {
    Signals::install().recv().await
}
