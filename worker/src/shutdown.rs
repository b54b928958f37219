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

/// Installs the handlers and waits for the first signal.
pub async fn signal() {
    Signals::install().recv().await
}
