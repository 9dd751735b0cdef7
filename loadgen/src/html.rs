//! The self-contained HTML report (charts drawn with plotters as inline SVG).
//!
//! The page needs no external assets and no JavaScript: inline CSS, inline
//! SVG. Without TTF fonts plotters falls back to its naive font metrics,
//! which is all the SVG backend needs: it emits `<text>` elements and lets
//! the browser render them.

use std::error::Error;

use plotters::prelude::*;

use crate::report::{human, Report, Sample};

/// Chart size in pixels.
const SIZE: (u32, u32) = (960, 380);

/// Line colour of each phase of the run (and of the baseline run).
const PHASES: [(&str, RGBColor); 5] = [
    ("connect", RGBColor(150, 150, 150)),
    ("warmup", RGBColor(230, 140, 20)),
    ("measure", RGBColor(30, 100, 200)),
    ("drain", RGBColor(150, 70, 170)),
    ("baseline", RGBColor(40, 160, 70)),
];

/// Inline style sheet.
const CSS: &str = "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1000px;\
color:#222;padding:0 1em}h1{font-size:1.6em}h2{font-size:1.2em;margin-top:1.6em}\
table{border-collapse:collapse}td,th{padding:.2em .8em;border-bottom:1px solid #ddd;\
text-align:left;vertical-align:top}th{font-weight:600}pre{background:#f4f4f4;padding:1em;\
overflow:auto}svg{max-width:100%;height:auto}.note{color:#666}";

/// The report as one HTML page.
pub(crate) fn page(report: &Report) -> String {
    let scenario = escape(&report.scenario);
    let throughput = if report.timeline.is_empty() && report.baseline_timeline.is_empty() {
        "<p class=\"note\">No per-second samples were recorded.</p>".to_owned()
    } else {
        chart(throughput_svg(report))
    };
    let latency = if report.latency_buckets.is_empty() {
        "<p class=\"note\">This scenario measures no latency.</p>".to_owned()
    } else {
        chart(latency_svg(&report.latency_buckets))
    };
    let figures: Vec<(String, String)> = report
        .figures
        .iter()
        .map(|(k, v)| (k.replace('_', " "), v.to_string()))
        .collect();
    let config =
        serde_json::to_string_pretty(&report.config).unwrap_or_else(|_| report.config.to_string());
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>mpp-loadgen: {scenario}</title><style>{CSS}</style></head><body>\n\
         <h1>mpp-loadgen: {scenario}</h1>\n<h2>Summary</h2>\n{}\n\
         <h2>Throughput over time</h2>\n{throughput}\n<h2>Latency distribution</h2>\n{latency}\n\
         <h2>Figures</h2>\n{}\n<h2>Configuration</h2>\n<pre>{}</pre>\n</body></html>\n",
        table(&summary(report)),
        table(&figures),
        escape(&config),
    )
}

/// Escapes text for HTML element content and quoted attribute values.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A two-column table, both columns escaped.
fn table(rows: &[(String, String)]) -> String {
    if rows.is_empty() {
        return "<p class=\"note\">None.</p>".to_owned();
    }
    let body: String = rows
        .iter()
        .map(|(k, v)| format!("<tr><th>{}</th><td>{}</td></tr>\n", escape(k), escape(v)))
        .collect();
    format!("<table>\n{body}</table>")
}

/// The main figures, as in the table printed on stdout.
fn summary(r: &Report) -> Vec<(String, String)> {
    let mut rows: Vec<(String, String)> = vec![
        ("scenario".into(), r.scenario.clone()),
        ("devices".into(), r.devices.to_string()),
        ("devices held".into(), r.devices_held.to_string()),
        ("measured".into(), format!("{:.1} s", r.duration_s)),
        (format!("{}/s", r.rate_name), human(r.rate_per_s)),
        (
            "per second".into(),
            format!(
                "min {} median {} max {}",
                human(r.rate_min_per_s),
                human(r.rate_median_per_s),
                human(r.rate_max_per_s)
            ),
        ),
    ];
    if let (Some(b), Some(name)) = (r.baseline_rate_per_s, &r.baseline) {
        rows.push((format!("{name} baseline/s"), human(b)));
    }
    if let Some(x) = r.ratio {
        rows.push(("ratio to baseline".into(), format!("{x:.3}")));
    }
    if let Some(l) = &r.latency_us {
        rows.push((
            "latency µs".into(),
            format!(
                "mean {:.1} p50 {} p90 {} p99 {} p99.9 {} max {} (n={})",
                l.mean, l.p50, l.p90, l.p99, l.p999, l.max, l.count
            ),
        ));
    }
    rows.push(("lost".into(), r.lost.to_string()));
    rows.push(("wrong".into(), r.wrong.to_string()));
    if let Some(b) = r.node_rss_bytes_per_device {
        rows.push(("node RSS bytes/device".into(), format!("{b:.1}")));
    }
    rows.push((
        "loadgen CPU".into(),
        format!("{:.0} %", r.loadgen_cpu * 100.0),
    ));
    if let Some(c) = r.node_cpu {
        rows.push(("node CPU".into(), format!("{:.0} %", c * 100.0)));
    }
    rows
}

/// A chart's SVG, or a note saying why it could not be drawn.
fn chart(svg: Result<String, Box<dyn Error>>) -> String {
    match svg {
        Ok(svg) => svg,
        Err(e) => format!(
            "<p class=\"note\">Chart unavailable: {}</p>",
            escape(&e.to_string())
        ),
    }
}

/// A non-empty axis range around `lo..hi`, or `fallback` when neither is finite.
fn span(lo: f64, hi: f64, fallback: (f64, f64)) -> (f64, f64) {
    if !lo.is_finite() || !hi.is_finite() || lo > hi {
        fallback
    } else if hi - lo < f64::EPSILON * hi.abs().max(1.0) {
        (lo - 1.0, hi + 1.0)
    } else {
        (lo, hi)
    }
}

/// Smallest and largest of some values (infinite when there are none).
fn extent(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    })
}

/// Whether a time or rate can be plotted: finite and below 10^15 (plotters
/// spins on axis ranges wider than that, e.g. `-f64::MAX..f64::MAX`).
fn sane(v: f64) -> bool {
    v.is_finite() && v.abs() < 1e15
}

/// The line colour of a phase.
fn colour(phase: &str) -> RGBColor {
    PHASES
        .iter()
        .find(|(p, _)| *p == phase)
        .map_or(RGBColor(0, 0, 0), |(_, c)| *c)
}

/// Rate (left axis) and devices held (right axis) over time, one line per
/// phase, the measured window shaded, plus the baseline run's rate.
fn throughput_svg(r: &Report) -> Result<String, Box<dyn Error>> {
    let ok = |s: &&Sample| sane(s.t_s) && sane(s.rate_per_s);
    let all = || r.timeline.iter().chain(&r.baseline_timeline).filter(ok);
    let (t0, t1) = extent(all().map(|s| s.t_s));
    let (t0, t1) = span(t0, t1, (0.0, 1.0));
    let top = all().map(|s| s.rate_per_s).fold(0.0, f64::max);
    let (_, top) = span(0.0, top * 1.1, (0.0, 1.0));
    let held = r.timeline.iter().map(|s| s.devices_held).max().unwrap_or(0);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .right_y_label_area_size(if held > 0 { 70 } else { 0 })
            .build_cartesian_2d(t0..t1, 0.0..top)?
            .set_secondary_coord(t0..t1, 0.0..(held.max(1) as f64 * 1.1));
        chart
            .configure_mesh()
            .x_desc("seconds since start")
            .y_desc(format!("{}/s", r.rate_name))
            .y_label_formatter(&|v| human(*v))
            .draw()?;
        let measure = r
            .timeline
            .iter()
            .filter(ok)
            .filter(|s| s.phase == "measure");
        let (m0, m1) = extent(measure.map(|s| s.t_s));
        if m0 <= m1 {
            let shade = colour("measure").mix(0.1).filled();
            let corners = [(m0.max(t0), 0.0), (m1.min(t1), top)];
            chart.draw_series([Rectangle::new(corners, shade)])?;
        }
        if held > 0 {
            chart
                .configure_secondary_axes()
                .y_desc("devices held")
                .y_label_formatter(&|v| human(*v))
                .draw()?;
            let pts = r
                .timeline
                .iter()
                .filter(|s| sane(s.t_s))
                .map(|s| (s.t_s, s.devices_held as f64));
            let grey = RGBColor(120, 120, 120);
            chart
                .draw_secondary_series(DashedLineSeries::new(pts, 4, 3, grey.stroke_width(1)))?
                .label("devices held")
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], grey));
        }
        let mut seen: Vec<&str> = Vec::new();
        let mut prev: Option<(f64, f64)> = None;
        let timeline: Vec<&Sample> = r.timeline.iter().filter(ok).collect();
        for run in timeline.chunk_by(|a, b| a.phase == b.phase) {
            let phase = run[0].phase;
            let pts: Vec<(f64, f64)> = prev
                .into_iter()
                .chain(run.iter().map(|s| (s.t_s, s.rate_per_s)))
                .collect();
            prev = pts.last().copied();
            let style = colour(phase).stroke_width(2);
            let anno = chart.draw_series(LineSeries::new(pts, style))?;
            if !seen.contains(&phase) {
                seen.push(phase);
                anno.label(phase)
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], style));
            }
        }
        let base: Vec<(f64, f64)> = r
            .baseline_timeline
            .iter()
            .filter(ok)
            .map(|s| (s.t_s, s.rate_per_s))
            .collect();
        if !base.is_empty() {
            let style = colour("baseline").stroke_width(2);
            let name = format!("baseline ({})", r.baseline.as_deref().unwrap_or("run"));
            chart
                .draw_series(LineSeries::new(base, style))?
                .label(name)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], style));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    Ok(svg)
}

/// Latency in µs with a readable unit.
fn fmt_us(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1} s", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1} ms", v / 1e3)
    } else {
        format!("{v:.0} µs")
    }
}

/// Samples per log2 latency bucket (bars on a log axis), plus the cumulative
/// share of samples on the right axis.
fn latency_svg(buckets: &[(u64, u64)]) -> Result<String, Box<dyn Error>> {
    let mut bars: Vec<(f64, f64, f64)> = Vec::with_capacity(buckets.len());
    for &(upper, count) in buckets {
        let hi = (upper as f64).max(1.0);
        let lo = bars.last().map_or(hi / 2.0, |b| b.1);
        let lo = if lo < hi { lo } else { hi / 2.0 };
        bars.push((lo, hi, count as f64));
    }
    let (x0, x1) = match (bars.first(), bars.last()) {
        (Some(f), Some(l)) => (f.0, l.1.max(f.0 * 2.0)),
        _ => (0.5, 1.0),
    };
    let top = bars.iter().map(|b| b.2).fold(0.0, f64::max).max(1.0) * 1.1;
    let total: f64 = bars.iter().map(|b| b.2).sum::<f64>().max(1.0);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .right_y_label_area_size(60)
            .build_cartesian_2d((x0..x1).log_scale(), 0.0..top)?
            .set_secondary_coord((x0..x1).log_scale(), 0.0..100.0);
        chart
            .configure_mesh()
            .x_desc("latency (log scale)")
            .y_desc("samples")
            .x_label_formatter(&|v| fmt_us(*v))
            .y_label_formatter(&|v| human(*v))
            .draw()?;
        chart
            .configure_secondary_axes()
            .y_desc("cumulative %")
            .y_label_formatter(&|v| format!("{v:.0}"))
            .draw()?;
        let fill = colour("measure").mix(0.7).filled();
        chart.draw_series(
            bars.iter()
                .map(|&(lo, hi, n)| Rectangle::new([(lo, 0.0), (hi, n)], fill)),
        )?;
        let mut acc = 0.0;
        let cdf = bars.iter().map(|&(_, hi, n)| {
            acc += n;
            (hi, 100.0 * acc / total)
        });
        chart.draw_secondary_series(LineSeries::new(cdf, colour("warmup").stroke_width(2)))?;
        root.present()?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t_s: f64, phase: &'static str, rate_per_s: f64, devices_held: u64) -> Sample {
        Sample {
            t_s,
            phase,
            rate_per_s,
            devices_held,
        }
    }

    fn full() -> Report {
        let mut r = Report::new(
            "fan<out> & \"co\"",
            "notifications",
            serde_json::json!({"devices": 1000, "tag": "<b>"}),
        );
        r.devices = 1000;
        r.devices_held = 990;
        r.rate_per_s = 120_000.0;
        r.figure("sent_total", 1_000_000);
        let phases = [
            "connect", "connect", "warmup", "measure", "measure", "measure", "drain",
        ];
        r.timeline = phases
            .iter()
            .enumerate()
            .map(|(i, p)| sample(i as f64, p, 1e5 + i as f64 * 1e4, 500 + i as u64 * 80))
            .collect();
        r.set_window_stats();
        r.set_baseline(
            "raw fan-out",
            crate::report::Baseline {
                rate: 2e5,
                server_cpu: Some(1.0),
                timeline: (0..5)
                    .map(|i| sample(f64::from(i), "baseline", 2e5, 0))
                    .collect(),
            },
        );
        r.latency_us = Some(crate::report::Latency {
            count: 100,
            mean: 40.0,
            p50: 31,
            p90: 63,
            p99: 127,
            p999: 255,
            max: 300,
        });
        r.latency_buckets = vec![
            (1, 0),
            (3, 2),
            (7, 10),
            (15, 40),
            (31, 30),
            (63, 10),
            (127, 5),
            (255, 2),
            (511, 1),
        ];
        r
    }

    #[test]
    fn html_full_report() {
        let page = page(&full());
        assert_eq!(page.matches("<svg").count(), 2, "two charts");
        assert!(page.contains("fan&lt;out&gt; &amp; &quot;co&quot;"));
        assert!(!page.contains("fan<out>"));
        assert!(page.contains("&lt;b&gt;") && page.contains("sent total"));
        assert!(!page.contains("Chart unavailable"));
        std::fs::write(std::env::temp_dir().join("sample-report.html"), &page).unwrap();
    }

    #[test]
    fn html_empty_report() {
        let page = page(&Report::new("x<y", "rate", serde_json::json!({})));
        assert!(page.contains("x&lt;y") && !page.contains("x<y"));
        assert!(page.contains("no latency") && page.ends_with("</html>\n"));
        assert!(!page.contains("<svg"));
    }

    #[test]
    fn html_degenerate_values() {
        let mut r = Report::new("nan", "rate", serde_json::Value::Null);
        r.rate_per_s = f64::NAN;
        r.ratio = Some(f64::INFINITY);
        r.timeline = vec![
            sample(0.0, "measure", f64::NAN, 0),
            sample(f64::NAN, "drain", 1.0, 3),
            sample(1.0, "odd", f64::INFINITY, 0),
        ];
        assert!(page(&r).contains("<svg"));
        r.timeline = vec![sample(5.0, "measure", 0.0, 0)];
        r.latency_buckets = vec![(0, 0)];
        assert_eq!(page(&r).matches("<svg").count(), 2);
        r.timeline = vec![
            sample(5.0, "measure", 1e300, u64::MAX),
            sample(6.0, "measure", f64::MAX, 1),
        ];
        r.baseline_timeline = vec![sample(f64::INFINITY, "baseline", f64::NAN, 0)];
        r.latency_buckets = vec![(u64::MAX, u64::MAX), (1, 1)];
        assert_eq!(page(&r).matches("<svg").count(), 2);
        r.timeline = vec![
            sample(-f64::MAX, "x", -f64::MAX, 0),
            sample(f64::MAX, "y", 0.0, 0),
        ];
        assert_eq!(page(&r).matches("<svg").count(), 2);
    }
}
