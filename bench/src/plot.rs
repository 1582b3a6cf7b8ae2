//! `plot`: draws the sweeps `bench/run` measured into one SVG (four panels: throughput
//! and p99 by message size, throughput and p99 by concurrency), so the curves can be
//! read at a glance and committed beside the README.
//!
//! Input: a tab-separated file, one point per line: `sweep x series y`, where sweep is
//! `size` or `sessions`, x the message size in bytes or the session count, series a
//! label (`relay MB/s`, `ceiling MB/s`, `relay p99 ms`, ...) and y the value.

use std::{collections::BTreeMap, path::Path};

use anyhow::{Context, Result, bail};
use plotters::prelude::*;

/// Points of one series, by x.
type Series = BTreeMap<String, Vec<(f64, f64)>>;

fn read(path: &Path) -> Result<BTreeMap<String, Series>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let mut sweeps: BTreeMap<String, Series> = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split('\t').collect();
        let [sweep, x, series, y] = f.as_slice() else {
            bail!(
                "{}:{}: expected 4 tab-separated fields",
                path.display(),
                n + 1
            );
        };
        let (Ok(x), Ok(y)) = (x.parse::<f64>(), y.parse::<f64>()) else {
            // A run that produced no figure ("-") is left out of the curve.
            continue;
        };
        sweeps
            .entry(sweep.to_string())
            .or_default()
            .entry(series.to_string())
            .or_default()
            .push((x, y));
    }
    for series in sweeps.values_mut() {
        for points in series.values_mut() {
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
    }
    Ok(sweeps)
}

/// Tick labels sit at powers of ten, so they read in decimal units.
fn size_label(bytes: f64) -> String {
    if bytes >= 1e6 {
        format!("{:.0} MB", bytes / 1e6)
    } else if bytes >= 1e3 {
        format!("{:.0} KB", bytes / 1e3)
    } else {
        format!("{bytes:.0} B")
    }
}

fn value_label(v: f64) -> String {
    if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
];

/// One panel: the series of `sweep` whose label ends with `unit`, on log-log axes.
fn panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    title: &str,
    series: &Series,
    unit: &str,
    size_axis: bool,
) -> Result<()> {
    let chosen: Vec<(&String, &Vec<(f64, f64)>)> = series
        .iter()
        .filter(|(name, points)| name.ends_with(unit) && !points.is_empty())
        .collect();
    if chosen.is_empty() {
        area.titled(&format!("{title} (no data)"), ("sans-serif", 16))?;
        return Ok(());
    }
    let all = chosen.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let x_range = (x0 / 1.5).max(1e-9)..(x1 * 1.5);
    let y_range = (y0 / 2.0).max(1e-6)..(y1 * 2.0);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(55)
        .build_cartesian_2d(x_range.log_scale(), y_range.log_scale())?;
    let x_desc = if size_axis {
        "message size"
    } else {
        "concurrent sessions"
    };
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(unit)
        .y_labels(6)
        .y_label_formatter(&|y| value_label(*y))
        .x_label_formatter(&|x| {
            if size_axis {
                size_label(*x)
            } else {
                format!("{x:.0}")
            }
        })
        .draw()?;
    for (i, (name, points)) in chosen.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        chart.draw_series(
            points
                .iter()
                .map(|&(x, y)| Circle::new((x, y), 3, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    Ok(())
}

pub fn run(input: &Path, output: &Path) -> Result<()> {
    let sweeps = read(input)?;
    let empty = Series::new();
    let size = sweeps.get("size").unwrap_or(&empty);
    let sessions = sweeps.get("sessions").unwrap_or(&empty);
    let root = SVGBackend::new(output, (1100, 760)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        "domauth: costs as the work grows (bench/run)",
        ("sans-serif", 20),
    )?;
    let panels = root.split_evenly((2, 2));
    panel(&panels[0], "Throughput by message size", size, "MB/s", true)?;
    panel(
        &panels[1],
        "p99 latency by message size",
        size,
        "p99 ms",
        true,
    )?;
    panel(
        &panels[2],
        "Throughput by concurrency",
        sessions,
        "msg/s",
        false,
    )?;
    panel(
        &panels[3],
        "p99 latency by concurrency",
        sessions,
        "p99 ms",
        false,
    )?;
    root.present()
        .with_context(|| format!("write {}", output.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_what_it_reads_and_skips_missing_figures() {
        let dir = tempfile_dir();
        let input = dir.join("sweeps.tsv");
        std::fs::write(
            &input,
            "size\t1024\trelay MB/s\t2.5\nsize\t1048576\trelay MB/s\t90\nsize\t1024\trelay p99 ms\t-\n\
             sessions\t1\trelay msg/s\t500\nsessions\t100\trelay msg/s\t2000\n",
        )
        .unwrap();
        let sweeps = read(&input).unwrap();
        assert_eq!(
            sweeps["size"]["relay MB/s"],
            vec![(1024.0, 2.5), (1048576.0, 90.0)]
        );
        assert!(!sweeps["size"].contains_key("relay p99 ms"));
        let output = dir.join("out.svg");
        run(&input, &output).unwrap();
        let svg = std::fs::read_to_string(&output).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
        assert!(svg.contains("Throughput by message size"));
        assert!(svg.contains("relay MB/s"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("domauth-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
