//! What the daemons and the one-shot commands share: their async runtimes
//! and the shutdown signal.

use std::io;

use tokio::runtime::{Builder, Runtime};

/// A single-threaded runtime, for a command or an ADD that runs one task.
pub fn current_thread() -> io::Result<Runtime> {
    Builder::new_current_thread().enable_all().build()
}

/// The runtime of a long-running daemon (the agent, the manager): two
/// workers, so a slow handler never stalls the loop.
pub fn daemon() -> io::Result<Runtime> {
    Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
