//! What asks a process to stop: SIGTERM or SIGINT. Kubernetes (and the supervisor) stop a
//! worker with SIGTERM and wait its grace period before SIGKILL; a terminal sends SIGINT. Either
//! starts a graceful drain; a second one stops at once (unacked deliveries return to their
//! queues either way). One type serves the worker, the supervisor and `warren bench`.

use tokio::signal::unix::{signal as unix_signal, Signal, SignalKind};
use warren_common::env::{Env, ENV_WARREN_SUPERVISOR_PID};

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

    /// The next SIGTERM or SIGINT (also one that came before this was awaited).
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }

    /// Resolves on the first signal, the cue to drain; from then on a second one exits the
    /// process at once (status 130).
    pub async fn shutdown(mut self) {
        self.recv().await;
        tracing::info!("Shutdown requested; send the signal again to stop at once.");
        tokio::spawn(async move {
            self.recv().await;
            tracing::warn!("Second signal: exiting now; unfinished steps return to their queues.");
            std::process::exit(130);
        });
    }
}

/// Installs the handlers and waits for the first signal (see [`Signals::shutdown`]).
pub async fn signal() {
    Signals::install().shutdown().await
}

/// The pid of the supervisor that started this process, if one did.
pub(crate) fn supervisor_pid(env: &impl Env) -> Option<u32> {
    env.var(ENV_WARREN_SUPERVISOR_PID)?.parse().ok()
}

/// When a worker should drain: on the first signal or, when a supervisor started it, once that
/// supervisor is gone, so no worker outlives it.
pub(crate) async fn requested(signals: Signals, supervisor: Option<u32>) {
    match supervisor {
        Some(pid) => tokio::select! {
            _ = signals.shutdown() => {}
            _ = parent_gone(pid) => {}
        },
        None => signals.shutdown().await,
    }
}

/// Resolves once this process's parent is no longer `parent` (it died, even by SIGKILL, and the
/// process was handed to init). Polls once a second: Linux's parent-death signal needs `unsafe`
/// in `pre_exec`.
async fn parent_gone(parent: u32) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn supervisor_pid_is_read_from_the_env() {
        let env = |v: &str| HashMap::from([(ENV_WARREN_SUPERVISOR_PID.to_string(), v.to_string())]);
        assert_eq!(supervisor_pid(&env("4242")), Some(4242));
        assert_eq!(supervisor_pid(&env("nope")), None);
        assert_eq!(supervisor_pid(&HashMap::new()), None);
    }
}
