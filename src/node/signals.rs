//! Stop signals for the node process: SIGINT and SIGTERM, caught on the
//! control thread's runtime and turned into an orderly shutdown.
//!
//! The streams are created before `start` returns, so a signal that arrives
//! right after the start-up line is caught, not fatal.

use std::sync::Arc;

use super::StartError;

/// SIGINT and SIGTERM streams. Created before `start` returns, so a signal
/// that arrives right after the start-up line is caught, not fatal.
pub(super) struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    pub(super) fn install(runtime: &tokio::runtime::Runtime) -> Result<Self, StartError> {
        use tokio::signal::unix::{signal, SignalKind};
        let _guard = runtime.enter();
        let term = signal(SignalKind::terminate()).map_err(StartError::setup("handle SIGTERM"))?;
        let int = signal(SignalKind::interrupt()).map_err(StartError::setup("handle SIGINT"))?;
        Ok(Signals { term, int })
    }
}

/// Completes on `stop` or, when `signals` is given, on SIGTERM or SIGINT.
pub(super) async fn wait_for_stop(stop: Arc<tokio::sync::Notify>, signals: Option<Signals>) {
    match signals {
        None => stop.notified().await,
        Some(mut s) => {
            tokio::select! {
                _ = stop.notified() => {}
                _ = s.term.recv() => {}
                _ = s.int.recv() => {}
            }
        }
    }
}
