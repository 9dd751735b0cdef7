//! A minimal MQTT 3.1.1 client: QoS 0 fan-out through a broker.

use anyhow::{bail, Result};
use clap::Args;

use crate::report::Report;
use crate::Common;

/// `mqtt`.
#[derive(Args, Debug, Clone, serde::Serialize)]
pub(crate) struct MqttArgs {
    /// The broker's address.
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub(crate) broker: std::net::SocketAddr,
}

/// Runs the MQTT fan-out.
pub(crate) fn run(_common: &Common, _args: &MqttArgs) -> Result<Report> {
    bail!("mqtt: not implemented yet")
}
