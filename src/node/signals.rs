//! Signals of the node process: SIGINT and SIGTERM stop it in order, SIGHUP
//! asks it to reload what can change while it runs (docs/PROTOCOL.md §9).
//!
//! They are caught on the control thread's runtime through tokio's signal
//! streams (built on the `signal-hook-registry` crate, as `signal-hook` is:
//! no raw `libc::signal`). The streams are created before `start` returns,
//! so a signal that arrives right after the start-up line is caught, not
//! fatal. Nothing here acts on a signal: it only tells the control thread.

use std::sync::Arc;

use super::StartError;

/// SIGINT and SIGTERM streams, and SIGHUP's. Created before `start`
/// returns, so a signal that arrives right after the start-up line is
/// caught, not fatal.
pub(super) struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    /// SIGHUP, taken by the reload task.
    pub(super) hup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    pub(super) fn install(runtime: &tokio::runtime::Runtime) -> Result<Self, StartError> {
        use tokio::signal::unix::{signal, SignalKind};
        let _guard = runtime.enter();
        let term = signal(SignalKind::terminate()).map_err(StartError::setup("handle SIGTERM"))?;
        let int = signal(SignalKind::interrupt()).map_err(StartError::setup("handle SIGINT"))?;
        let hup = signal(SignalKind::hangup()).map_err(StartError::setup("handle SIGHUP"))?;
        Ok(Signals {
            term,
            int,
            hup: Some(hup),
        })
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

/// Completes at the next SIGHUP; never without a stream.
pub(super) async fn hangup(hup: &mut Option<tokio::signal::unix::Signal>) {
    match hup {
        Some(h) => {
            if h.recv().await.is_none() {
                // The stream ended (the runtime is going away): wait no more
                // on it.
                *hup = None;
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}
