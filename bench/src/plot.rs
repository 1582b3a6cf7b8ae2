//! `plot`: draws the sweeps `bench/run` measured into one SVG (four panels: throughput
//! and p99 by message size, throughput and p99 by concurrency), so the curves can be
//! read at a glance and committed beside the README.
//!
//! Input: a tab-separated file, one point per line: `sweep x series y`, where sweep is
//! `size` or `sessions`, x the message size in bytes or the session count, series a
//! label (`relay MB/s`, `postfix MB/s`, `TLS ceiling MB/s`, `plain ceiling MB/s`,
//! `disk sync MB/s`, `relay p99 ms`, `postfix p99 ms`, ...) and y the value. Lines
//! starting with `#` are comments.
//!
//! The relay is drawn in solid blue with dots, Postfix in solid red with triangles, the
//! ceilings and the disk as dashed lines (bounds, not servers); the legend goes to the
//! corner of each panel that its curves leave free.

use std::{collections::BTreeMap, path::Path};

use anyhow::{Context, Result, bail};
use plotters::element::DashedPathElement;
use plotters::prelude::*;

/// The points of one series, by x.
type Points = Vec<(f64, f64)>;
/// The series of one sweep, by name.
type Series = BTreeMap<String, Points>;

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
        if !(x > 0.0 && y > 0.0) {
            // Log axes: a zero (nothing measured) cannot be drawn.
            continue;
        }
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

/// Size ticks sit at the measured sizes, which are multiples of 1024 (`bench/run`'s
/// "1 KB" is 1024 bytes, "1 MB" 1048576).
fn size_label(bytes: f64) -> String {
    if bytes >= 1_048_576.0 {
        format!("{:.0} MB", bytes / 1_048_576.0)
    } else if bytes >= 1024.0 {
        format!("{:.0} KB", bytes / 1024.0)
    } else {
        format!("{bytes:.0} B")
    }
}

/// Grid lines of a log axis over `r`: the labelled ones at 1, 2, 5 times powers of ten
/// (only the powers over many decades, more steps over less than one), the light ones at
/// every other integer multiple. Plotters' own labels sit at powers of ten only, which
/// left a panel spanning one decade with a single label.
fn log_grid(r: &std::ops::Range<f64>) -> (Vec<f64>, Vec<f64>) {
    let (lo, hi) = (r.start.log10().floor() as i32, r.end.log10().ceil() as i32);
    let grid = |steps: &[f64]| -> Vec<f64> {
        (lo..=hi)
            .flat_map(|e| steps.iter().map(move |m| m * 10f64.powi(e)))
            .filter(|v| *v >= r.start && *v <= r.end)
            .collect()
    };
    let mut bold = grid(&[1.0, 2.0, 5.0]);
    if bold.len() > 10 {
        bold = grid(&[1.0]);
    } else if bold.len() < 4 {
        bold = grid(&[1.0, 1.5, 2.0, 3.0, 5.0, 7.0]);
    }
    let light = grid(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0])
        .into_iter()
        .filter(|v| !bold.iter().any(|b| (b - v).abs() <= 1e-9 * v))
        .collect();
    (bold, light)
}

fn value_label(v: f64) -> String {
    if v >= 10.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.2}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

const OTHER_COLORS: [RGBColor; 4] = [
    RGBColor(255, 127, 14),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Marker {
    Dot,
    Triangle,
    None,
}

/// How one series is drawn, and where it sits in the legend.
#[derive(Clone, Copy, Debug)]
struct Look {
    rank: usize,
    color: RGBColor,
    dashed: bool,
    marker: Marker,
}

/// Servers solid with markers (the relay blue, Postfix red); bounds dashed without.
fn look(name: &str, other: usize) -> Look {
    let (rank, color, dashed, marker) = if name.starts_with("relay") {
        (0, RGBColor(31, 119, 180), false, Marker::Dot)
    } else if name.starts_with("postfix") {
        (1, RGBColor(214, 39, 40), false, Marker::Triangle)
    } else if name.starts_with("TLS ceiling") {
        (2, RGBColor(44, 160, 44), true, Marker::None)
    } else if name.starts_with("plain ceiling") || name.starts_with("ceiling") {
        (3, RGBColor(110, 110, 110), true, Marker::None)
    } else if name.starts_with("disk") {
        (4, RGBColor(148, 103, 189), true, Marker::None)
    } else {
        (
            5 + other,
            OTHER_COLORS[other % OTHER_COLORS.len()],
            false,
            Marker::Dot,
        )
    };
    Look {
        rank,
        color,
        dashed,
        marker,
    }
}

const LEGEND_FONT: u32 = 13;

/// The legend's size in pixels (plotters' layout: a margin, an 18 px sample line, the
/// label; one row per series), estimated from the label lengths.
fn legend_px(labels: &[&str]) -> (f64, f64) {
    let longest = labels.iter().map(|l| l.chars().count()).max().unwrap_or(0);
    let w = 40.0 + longest as f64 * f64::from(LEGEND_FONT) * 0.6;
    let h = 12.0 + labels.len() as f64 * (f64::from(LEGEND_FONT) + 6.0);
    (w, h)
}

/// The corner (in the order tried) whose legend box the fewest curve samples cross.
/// `lines` are in axis fractions (0..1 on both axes, y up), `bw` / `bh` the legend's
/// size as fractions of the plotting area.
fn legend_corner(lines: &[Vec<(f64, f64)>], bw: f64, bh: f64) -> SeriesLabelPosition {
    let corners = [
        (SeriesLabelPosition::UpperLeft, 0.0, 1.0 - bh),
        (SeriesLabelPosition::UpperRight, 1.0 - bw, 1.0 - bh),
        (SeriesLabelPosition::LowerRight, 1.0 - bw, 0.0),
        (SeriesLabelPosition::LowerLeft, 0.0, 0.0),
    ];
    let mut samples = Vec::new();
    for line in lines {
        samples.extend(line.iter().copied());
        for w in line.windows(2) {
            let ((ax, ay), (bx, by)) = (w[0], w[1]);
            for k in 1..50 {
                let t = f64::from(k) / 50.0;
                samples.push((ax + (bx - ax) * t, ay + (by - ay) * t));
            }
        }
    }
    let mut best = (usize::MAX, 0);
    for (i, &(_, x0, y0)) in corners.iter().enumerate() {
        let hits = samples
            .iter()
            .filter(|&&(x, y)| x >= x0 && x <= x0 + bw && y >= y0 && y <= y0 + bh)
            .count();
        if hits < best.0 {
            best = (hits, i);
        }
    }
    corners[best.1].0.clone()
}

/// One panel: the series of `sweep` whose label ends with `unit` (less those starting
/// with one of `leave_out`), on log-log axes.
fn panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    title: &str,
    series: &Series,
    unit: &str,
    size_axis: bool,
    leave_out: &[&str],
) -> Result<()> {
    let mut chosen: Vec<(&String, &Points, Look)> = series
        .iter()
        .filter(|(name, points)| {
            name.ends_with(unit)
                && !points.is_empty()
                && !leave_out.iter().any(|p| name.starts_with(p))
        })
        .enumerate()
        .map(|(i, (name, points))| (name, points, look(name, i)))
        .collect();
    if chosen.is_empty() {
        area.titled(&format!("{title} (no data)"), ("sans-serif", 16))?;
        return Ok(());
    }
    chosen.sort_by_key(|(_, _, l)| l.rank);
    let all = chosen.iter().flat_map(|(_, p, _)| p.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let x_range = (x0 / 1.5).max(1e-9)..(x1 * 1.5);
    let y_range = (y0 / 2.0).max(1e-6)..(y1 * 2.0);
    let frac =
        |v: f64, r: &std::ops::Range<f64>| (v.ln() - r.start.ln()) / (r.end.ln() - r.start.ln());
    let lines: Vec<Vec<(f64, f64)>> = chosen
        .iter()
        .map(|(_, p, _)| {
            p.iter()
                .map(|&(x, y)| (frac(x, &x_range), frac(y, &y_range)))
                .collect()
        })
        .collect();
    // x: labelled at the measured points (1 KB .. 10 MB, 1 .. 500 sessions); y: log_grid.
    let mut xs: Vec<f64> = chosen
        .iter()
        .flat_map(|(_, p, _)| p.iter().map(|&(x, _)| x))
        .collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    let x_axis = x_range
        .clone()
        .log_scale()
        .with_key_points(xs.clone())
        .with_light_points({
            let (a, b) = log_grid(&x_range);
            // (none right beside a labelled size: 1000 beside 1024 reads as a double line)
            a.into_iter()
                .chain(b)
                .filter(|v| !xs.iter().any(|x| (x / v).ln().abs() < 0.15))
        });
    let (y_bold, y_light) = log_grid(&y_range);
    let y_axis = y_range
        .clone()
        .log_scale()
        .with_key_points(y_bold)
        .with_light_points(y_light);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(55)
        .build_cartesian_2d(x_axis, y_axis)?;
    let x_desc = if size_axis {
        "message size"
    } else {
        "concurrent sessions"
    };
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(unit)
        .y_label_formatter(&|y| value_label(*y))
        .x_label_formatter(&|x| {
            if size_axis {
                size_label(*x)
            } else {
                format!("{x:.0}")
            }
        })
        .draw()?;
    for (name, points, l) in &chosen {
        let color = l.color;
        let style = color.stroke_width(2);
        let drawn = if l.dashed {
            chart.draw_series(DashedLineSeries::new(points.iter().copied(), 7, 5, style))?
        } else {
            chart.draw_series(LineSeries::new(points.iter().copied(), style))?
        };
        let dashed = l.dashed;
        drawn.label(name.as_str()).legend(move |(x, y)| {
            if dashed {
                DashedPathElement::new(vec![(x, y), (x + 18, y)], 5, 3, style).into_dyn()
            } else {
                PathElement::new(vec![(x, y), (x + 18, y)], style).into_dyn()
            }
        });
        match l.marker {
            Marker::Dot => {
                chart.draw_series(
                    points
                        .iter()
                        .map(|&(x, y)| Circle::new((x, y), 3, color.filled())),
                )?;
            }
            Marker::Triangle => {
                chart.draw_series(
                    points
                        .iter()
                        .map(|&(x, y)| TriangleMarker::new((x, y), 5, color.filled())),
                )?;
            }
            Marker::None => {}
        }
    }
    let (w, h) = chart.plotting_area().dim_in_pixel();
    let labels: Vec<&str> = chosen.iter().map(|(n, _, _)| n.as_str()).collect();
    let (lw, lh) = legend_px(&labels);
    let corner = legend_corner(
        &lines,
        (lw / f64::from(w.max(1))).min(1.0),
        (lh / f64::from(h.max(1))).min(1.0),
    );
    chart
        .configure_series_labels()
        .label_font(("sans-serif", LEGEND_FONT))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(corner)
        .draw()?;
    Ok(())
}

pub fn run(input: &Path, output: &Path) -> Result<()> {
    let sweeps = read(input)?;
    let empty = Series::new();
    let size = sweeps.get("size").unwrap_or(&empty);
    let sessions = sweeps.get("sessions").unwrap_or(&empty);
    let root = SVGBackend::new(output, (1200, 860)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        "domauth: costs as the work grows (bench/run)",
        ("sans-serif", 20),
    )?;
    let panels = root.split_evenly((2, 2));
    panel(
        &panels[0],
        "Throughput by message size",
        size,
        "MB/s",
        true,
        &[],
    )?;
    // The plain ceiling's p99 (no TLS, no server work) is in the TSV but not drawn: the
    // panel compares the relay with Postfix, the TLS ceiling being the floor for both.
    panel(
        &panels[1],
        "p99 latency by message size",
        size,
        "p99 ms",
        true,
        &["plain ceiling", "ceiling"],
    )?;
    panel(
        &panels[2],
        "Throughput by concurrency",
        sessions,
        "msg/s",
        false,
        &[],
    )?;
    panel(
        &panels[3],
        "p99 latency by concurrency",
        sessions,
        "p99 ms",
        false,
        &[],
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
        let dir = tempfile_dir("read");
        let input = dir.join("sweeps.tsv");
        std::fs::write(
            &input,
            "# a comment\nsize\t1024\trelay MB/s\t2.5\nsize\t1048576\trelay MB/s\t90\nsize\t1024\trelay p99 ms\t-\n\
             size\t1024\tpostfix MB/s\t0\n\
             sessions\t1\trelay msg/s\t500\nsessions\t100\trelay msg/s\t2000\n",
        )
        .unwrap();
        let sweeps = read(&input).unwrap();
        assert_eq!(
            sweeps["size"]["relay MB/s"],
            vec![(1024.0, 2.5), (1048576.0, 90.0)]
        );
        assert!(!sweeps["size"].contains_key("relay p99 ms"));
        assert!(!sweeps["size"].contains_key("postfix MB/s"));
        let output = dir.join("out.svg");
        run(&input, &output).unwrap();
        let svg = std::fs::read_to_string(&output).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
        assert!(svg.contains("Throughput by message size"));
        assert!(svg.contains("relay MB/s"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn draws_every_series_of_the_size_sweep_with_a_legend() {
        let dir = tempfile_dir("all");
        let input = dir.join("sweeps.tsv");
        let mut tsv = String::new();
        for (x, k) in [
            (1024, 1.0),
            (102400, 10.0),
            (1048576, 20.0),
            (10485760, 25.0),
        ] {
            for (name, mbs, p99) in [
                ("plain ceiling", 70.0, 0.5),
                ("TLS ceiling", 40.0, 2.0),
                ("relay", 8.0, 10.0),
                ("postfix", 2.0, 40.0),
            ] {
                tsv.push_str(&format!("size\t{x}\t{name} MB/s\t{}\n", mbs * k));
                tsv.push_str(&format!("size\t{x}\t{name} p99 ms\t{}\n", p99 * k));
            }
            tsv.push_str(&format!("size\t{x}\tdisk sync MB/s\t800\n"));
        }
        std::fs::write(&input, tsv).unwrap();
        let output = dir.join("out.svg");
        run(&input, &output).unwrap();
        let svg = std::fs::read_to_string(&output).unwrap();
        for label in [
            "plain ceiling MB/s",
            "TLS ceiling MB/s",
            "relay MB/s",
            "postfix MB/s",
            "disk sync MB/s",
            "relay p99 ms",
            "postfix p99 ms",
            "TLS ceiling p99 ms",
        ] {
            assert!(svg.contains(label), "{label} missing from the legend");
        }
        // Not drawn: the plain ceiling's p99 (see run).
        assert!(!svg.contains("plain ceiling p99 ms"));
        // Dashed bounds are drawn as dashes: many short paths.
        assert!(svg.matches("<polyline").count() > 40);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn looks_tell_servers_from_bounds() {
        let relay = look("relay MB/s", 0);
        let postfix = look("postfix p99 ms", 1);
        let tls = look("TLS ceiling MB/s", 2);
        assert!(!relay.dashed && !postfix.dashed && tls.dashed);
        assert_ne!(relay.color, postfix.color);
        assert_ne!(relay.marker, postfix.marker);
        assert!(relay.rank < postfix.rank && postfix.rank < tls.rank);
    }

    #[test]
    fn the_legend_goes_where_the_curves_are_not() {
        // Rising from lower left to upper right: the upper left corner is free.
        let rising = vec![vec![(0.0, 0.0), (1.0, 1.0)]];
        assert!(matches!(
            legend_corner(&rising, 0.3, 0.3),
            SeriesLabelPosition::UpperLeft
        ));
        // High on the left, falling: the upper left is taken, the upper right free.
        let falling = vec![vec![(0.0, 0.95), (0.4, 0.6), (1.0, 0.1)]];
        assert!(matches!(
            legend_corner(&falling, 0.3, 0.3),
            SeriesLabelPosition::UpperRight
        ));
    }

    #[test]
    fn log_axes_get_labels_in_any_span() {
        // One decade: more than a single label.
        let (bold, light) = log_grid(&(635.0..9200.0));
        assert_eq!(
            bold,
            vec![700.0, 1000.0, 1500.0, 2000.0, 3000.0, 5000.0, 7000.0]
        );
        assert!(!light.contains(&1000.0) && light.contains(&4000.0));
        // Many decades: powers of ten only.
        let (bold, _) = log_grid(&(0.5..5000.0));
        assert_eq!(bold, vec![1.0, 10.0, 100.0, 1000.0]);
        assert_eq!(value_label(2.0), "2");
        assert_eq!(value_label(0.30000000000000004), "0.3");
        assert_eq!(value_label(1500.0), "1500");
    }

    fn tempfile_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("domauth-plot-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
