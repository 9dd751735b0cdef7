//! Runs a scenario: workers, the monitor, the report.

use anyhow::Result;

use crate::{Cli, Command};

/// Runs the command line's scenario.
pub(crate) fn run(cli: &Cli) -> Result<()> {
    let report = match &cli.command {
        Command::Mqtt(a) => crate::mqtt::run(&cli.common, a)?,
        _ => anyhow::bail!("not yet"),
    };
    finish(&cli.common, &report)
}

/// Prints the table and writes the files the flags ask for.
pub(crate) fn finish(common: &crate::Common, report: &crate::report::Report) -> Result<()> {
    report.print_table(&mut std::io::stdout().lock())?;
    if let Some(p) = &common.json {
        report.write_json(p)?;
    }
    if let Some(p) = &common.html {
        report.write_html(p)?;
    }
    Ok(())
}
