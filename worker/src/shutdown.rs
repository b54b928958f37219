//! Process signals. Kubernetes (and the supervisor) stop a worker with SIGTERM and wait its grace
//! period before SIGKILL; a terminal sends SIGINT. Either starts a graceful drain; a second one
//! exits at once (unacked deliveries return to their queues either way).

use tokio::signal::unix::{signal as unix_signal, SignalKind};

/// Resolves on the first SIGTERM or SIGINT; a second one exits the process immediately.
pub async fn signal() {
    let mut term = unix_signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = unix_signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("Shutdown requested; send the signal again to stop at once.");
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("Second signal: exiting now; unfinished steps return to their queues.");
        std::process::exit(130);
    });
}
