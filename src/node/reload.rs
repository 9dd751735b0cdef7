//! Reloading a running node (SIGHUP, or [`super::Node::reload`]): what can
//! change live is applied, what cannot is named as needing a restart.
//!
//! Applied live: the log filter (`log_level`, through the process's
//! [`Operator`]), the STUN rate limits (`stun_rate`, `stun_burst`, handed
//! to every shard through the router), and the key and revocation files
//! (looked at at once instead of at the next one-second poll). Every other
//! setting is fixed by what it built at start (sockets, threads, buffers,
//! tables) and is reported as "needs a restart", again at each reload until
//! the node restarts. This module decides and reports; it must not touch a
//! shard's state except through router messages, and a configuration that
//! does not read or validate changes nothing.

use super::router::ShardMessage;
use super::NodeHandle;
use crate::config::{NodeConfig, SETTINGS};

/// What the process that runs a node lets the node change in it, and tells
/// it. `mppd` implements it over its command line and its logging; a node
/// started without one reloads only its key and revocation files.
pub trait Operator: Send + Sync + 'static {
    /// Reads the configuration again, from the same file, `MPPD_*`
    /// variables and flags as at start; `Err` with a one-line reason.
    fn reload_config(&self) -> Result<NodeConfig, String>;
    /// Makes `filter` (a `log_level` value) the log filter in force.
    fn set_log_level(&self, filter: &str) -> Result<(), String>;
    /// The node begins to stop (for a supervisor: systemd's `STOPPING=1`).
    fn stopping(&self) {}
}

/// What one reload did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// What now runs with new values: setting keys, and `master_keys` /
    /// `revocations` for the key files.
    pub applied: Vec<String>,
    /// Settings whose new value waits for a restart.
    pub needs_restart: Vec<String>,
    /// Why (part of) the reload failed; what it names was not applied.
    pub errors: Vec<String>,
}

/// Settings a reload applies; every other one needs a restart.
pub const LIVE_SETTINGS: &[&str] = &["log_level", "stun_rate", "stun_burst"];

/// The control thread's reloading state: the configuration in force.
pub(super) struct Reloader {
    pub(super) running: NodeConfig,
    pub(super) operator: Option<std::sync::Arc<dyn Operator>>,
}

impl Reloader {
    /// Reads the configuration again and applies what can change live.
    /// `keyring` is what the key files' poll found changed (already applied).
    pub(super) fn reload(
        &mut self,
        node: &NodeHandle,
        keyring: Result<(bool, bool), String>,
    ) -> ReloadReport {
        let mut report = ReloadReport::default();
        match keyring {
            Ok((keys, revocations)) => {
                if keys {
                    report.applied.push("master_keys".into());
                }
                if revocations {
                    report.applied.push("revocations".into());
                }
            }
            Err(e) => report.errors.push(e),
        }
        let Some(operator) = self.operator.clone() else {
            log(&report);
            return report;
        };
        let new = match operator.reload_config().and_then(|c| {
            c.validate().map_err(|e| e.to_string())?;
            Ok(c)
        }) {
            Ok(c) => c,
            Err(e) => {
                report
                    .errors
                    .push(format!("configuration not reloaded: {e}"));
                log(&report);
                return report;
            }
        };
        let mut limits = false;
        for setting in SETTINGS {
            let key = setting.key;
            let (old, now) = (self.running.value_toml(key), new.value_toml(key));
            if old == now {
                continue;
            }
            let change = format!("{key} ({} -> {})", shown(&old), shown(&now));
            match key {
                "log_level" => match operator.set_log_level(&new.log_level) {
                    Ok(()) => {
                        self.running.log_level = new.log_level.clone();
                        report.applied.push(change);
                    }
                    Err(e) => report.errors.push(format!("log_level not changed: {e}")),
                },
                "stun_rate" => {
                    self.running.stun_rate = new.stun_rate;
                    limits = true;
                    report.applied.push(change);
                }
                "stun_burst" => {
                    self.running.stun_burst = new.stun_burst;
                    limits = true;
                    report.applied.push(change);
                }
                _ => report.needs_restart.push(change),
            }
        }
        if limits {
            let (rate, burst) = (self.running.stun_rate, self.running.stun_burst);
            node.router
                .broadcast(|| ShardMessage::StunLimits { rate, burst });
        }
        log(&report);
        report
    }
}

fn shown(v: &Option<toml::Value>) -> String {
    v.as_ref()
        .map_or_else(|| "unset".into(), ToString::to_string)
}

fn log(report: &ReloadReport) {
    let list = |v: &[String]| {
        if v.is_empty() {
            "nothing".to_string()
        } else {
            v.join(", ")
        }
    };
    for e in &report.errors {
        tracing::error!(error = %e, "reload");
    }
    tracing::info!(
        applied = %list(&report.applied),
        needs_restart = %list(&report.needs_restart),
        "reloaded: applied {}; needs a restart: {}",
        list(&report.applied),
        list(&report.needs_restart),
    );
}
