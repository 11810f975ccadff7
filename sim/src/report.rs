//! What `fl-sim run` and `fl-sim compare` write: `metrics.jsonl`, `metrics.csv`, `summary.json`,
//! SVG plots of accuracy against virtual time and against bytes sent, and for a comparison a table
//! of the summaries (`comparison.md`, `comparison.csv`).

use crate::experiment::{MetricRecord, RunOutput, Summary};
use anyhow::{Context, Result};
use plotters::prelude::*;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(String::new, |v| format!("{v}"))
}

/// The CSV header of `metrics.csv`.
pub const METRICS_CSV_HEADER: &str = "version,time_s,wall_s,accuracy,loss,client_loss,bytes_up,bytes_down,updates,updates_folded,staleness_mean,staleness_max";

/// Writes one run's files into `dir` (created if needed).
pub fn write_run(dir: &Path, out: &RunOutput) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut jsonl = Vec::new();
    let mut csv = format!("{METRICS_CSV_HEADER}\n");
    for r in &out.records {
        writeln!(jsonl, "{}", serde_json::to_string(r)?)?;
        writeln!(
            csv,
            "{},{},{},{},{},{},{},{},{},{},{},{}",
            r.version,
            r.time_s,
            r.wall_s,
            opt(r.accuracy),
            opt(r.loss),
            opt(r.client_loss),
            r.bytes_up,
            r.bytes_down,
            r.updates,
            r.updates_folded,
            r.staleness_mean,
            r.staleness_max
        )?;
    }
    write_file(&dir.join("metrics.jsonl"), &jsonl)?;
    write_file(&dir.join("metrics.csv"), csv.as_bytes())?;
    write_file(
        &dir.join("summary.json"),
        (serde_json::to_string_pretty(&out.summary)? + "\n").as_bytes(),
    )?;
    write_file(
        &dir.join("experiment.toml"),
        toml::to_string_pretty(&out.config)
            .context("re-serialising the experiment")?
            .as_bytes(),
    )?;
    if out.records.iter().any(|r| r.accuracy.is_some()) {
        plot_accuracy(dir, &[out])?;
    }
    Ok(())
}

/// Draws `accuracy_vs_time.svg` and `accuracy_vs_bytes.svg` in `dir`, one line per run.
pub fn plot_accuracy(dir: &Path, runs: &[&RunOutput]) -> Result<()> {
    let series = |x: fn(&MetricRecord) -> f64| -> Vec<(String, Vec<(f64, f64)>)> {
        runs.iter()
            .map(|run| {
                let points = run
                    .records
                    .iter()
                    .filter_map(|r| r.accuracy.map(|a| (x(r), a)))
                    .collect();
                (run.summary.name.clone(), points)
            })
            .collect()
    };
    let target = runs.iter().find_map(|r| r.summary.target_accuracy);
    line_plot(
        &dir.join("accuracy_vs_time.svg"),
        "Test accuracy against virtual time",
        "virtual time (s)",
        &series(|r| r.time_s),
        target,
    )?;
    line_plot(
        &dir.join("accuracy_vs_bytes.svg"),
        "Test accuracy against bytes sent (up + down)",
        "MB sent",
        &series(|r| (r.bytes_up + r.bytes_down) as f64 / 1e6),
        target,
    )
}

fn line_plot(
    path: &Path,
    title: &str,
    x_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
    target: Option<f64>,
) -> Result<()> {
    let draw = || -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
        root.fill(&WHITE)?;
        let points = series.iter().flat_map(|(_, p)| p.iter());
        let x_max = points.clone().map(|p| p.0).fold(0.0f64, f64::max).max(1e-9);
        // The y axis starts below the lowest accuracy after each run's initial (random) model,
        // so the part researchers compare is not squashed against the top.
        let after_start = series.iter().flat_map(|(_, p)| p.iter().skip(1));
        let lowest = after_start.map(|p| p.1).fold(1.0f64, f64::min);
        let y_min = (((lowest - 0.02) / 0.05).floor() * 0.05).clamp(0.0, 0.9);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..x_max * 1.02, y_min..1.0)?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc("test accuracy")
            .draw()?;
        if let Some(t) = target {
            chart.draw_series(LineSeries::new(
                [(0.0, t), (x_max * 1.02, t)],
                BLACK.mix(0.4).stroke_width(1),
            ))?;
        }
        for (i, (name, pts)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))
}

fn cell(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "—".into(), |v| format!("{v:.digits$}"))
}

/// The comparison table as Markdown, one row per run.
pub fn comparison_table(summaries: &[&Summary]) -> String {
    let mut s = String::from(
        "| experiment | rule | scheduler | rounds | virtual time (s) | final acc | best acc | target | rounds to target | time to target (s) | MB up | MB down |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for m in summaries {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.1} | {} | {} | {} | {} | {} | {:.1} | {:.1} |",
            m.name,
            m.totals.rule,
            m.totals.scheduler,
            m.totals.rounds,
            m.totals.time_s,
            cell(m.totals.final_accuracy, 4),
            cell(m.totals.best_accuracy, 4),
            cell(m.target_accuracy, 3),
            m.rounds_to_target.map_or_else(|| "—".into(), |r| r.to_string()),
            cell(m.time_to_target_s, 1),
            m.totals.bytes_up as f64 / 1e6,
            m.totals.bytes_down as f64 / 1e6,
        );
    }
    s
}

/// Writes the comparison of several runs into `dir`: the shared plots, `comparison.md` and
/// `comparison.csv`.
pub fn write_comparison(dir: &Path, runs: &[&RunOutput]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let summaries: Vec<&Summary> = runs.iter().map(|r| &r.summary).collect();
    write_file(
        &dir.join("comparison.md"),
        comparison_table(&summaries).as_bytes(),
    )?;
    let mut csv = String::from(
        "name,rule,scheduler,rounds,time_s,final_accuracy,best_accuracy,target_accuracy,rounds_to_target,time_to_target_s,bytes_up,bytes_down,wall_time_s\n",
    );
    for m in &summaries {
        let _ = writeln!(
            csv,
            "{},{},{},{},{},{},{},{},{},{},{},{},{}",
            m.name,
            m.totals.rule,
            m.totals.scheduler,
            m.totals.rounds,
            m.totals.time_s,
            opt(m.totals.final_accuracy),
            opt(m.totals.best_accuracy),
            opt(m.target_accuracy),
            m.rounds_to_target.map_or_else(String::new, |r| r.to_string()),
            opt(m.time_to_target_s),
            m.totals.bytes_up,
            m.totals.bytes_down,
            m.totals.wall_time_s
        );
    }
    write_file(&dir.join("comparison.csv"), csv.as_bytes())?;
    if runs
        .iter()
        .any(|r| r.records.iter().any(|m| m.accuracy.is_some()))
    {
        plot_accuracy(dir, runs)?;
    }
    Ok(())
}
