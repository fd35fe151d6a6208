//! The charts of a run, drawn as SVG with plotters: `throughput.svg` (requests per second of each target,
//! grouped by worker count, against nginx's hop) and `latency.svg` (the latency percentiles at the fixed
//! rate, one line per target). A chart never fails the run: a drawing error is a warning, and a figure that
//! was not measured (nginx or oha missing) is left out of its chart.

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::Error;

/// The percentiles of the latency chart: their names (oha's `latencyPercentiles` keys) and quantiles.
pub(crate) const PERCENTILES: [(&str, f64); 4] =
    [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999)];

/// The throughput of the targets at one worker count, in requests per second; `None` when not measured.
pub(crate) struct ThroughputGroup {
    pub workers: usize,
    pub direct: Option<f64>,
    pub nginx: Option<f64>,
    pub bare: Option<f64>,
    pub hit: Option<f64>,
}

/// The bars of each group: the target's name in the legend, its colour, and its figure.
type Bar = (&'static str, RGBColor, fn(&ThroughputGroup) -> Option<f64>);

const BARS: [Bar; 4] = [
    ("direct upstream (no proxy)", RGBColor(130, 130, 130), |g| {
        g.direct
    }),
    ("nginx proxy hop (reference)", RGBColor(46, 139, 87), |g| {
        g.nginx
    }),
    ("bare hyper proxy hop", RGBColor(65, 105, 225), |g| g.bare),
    ("sidecar, cache hit", RGBColor(220, 90, 30), |g| g.hit),
];

/// The latency of one target at the fixed rate, in ms at each of [`PERCENTILES`]; `None` when not measured.
pub(crate) struct LatencyLine {
    pub name: &'static str,
    pub ms: Option<[f64; 4]>,
}

const LINE_COLOURS: [RGBColor; 3] = [
    RGBColor(130, 130, 130),
    RGBColor(46, 139, 87),
    RGBColor(220, 90, 30),
];

/// What the charts of a run show.
pub(crate) struct Charts<'a> {
    /// Where the throughput figures come from, for the title (e.g. `oha, 32 connections, median of 3`).
    pub throughput_source: String,
    pub throughput: &'a [ThroughputGroup],
    /// The rate and where the latency figures come from, for the title (e.g. `1000 requests/s, oha, …`).
    pub latency_source: String,
    pub latency: &'a [LatencyLine],
}

/// Draws both charts into `dir` (created when missing); the paths written. Failures are printed as warnings.
pub(crate) fn write(dir: &Path, charts: &Charts<'_>) -> Vec<PathBuf> {
    if let Err(e) = std::fs::create_dir_all(dir) {
        eprintln!("warning: no charts: cannot create {}: {e}", dir.display());
        return Vec::new();
    }
    let mut written = Vec::new();
    let throughput = dir.join("throughput.svg");
    match draw_throughput(&throughput, charts) {
        Ok(()) => written.push(throughput),
        Err(e) => eprintln!("warning: {} not drawn: {e}", throughput.display()),
    }
    let latency = dir.join("latency.svg");
    match draw_latency(&latency, charts) {
        Ok(()) => written.push(latency),
        Err(e) => eprintln!("warning: {} not drawn: {e}", latency.display()),
    }
    written
}

/// `1 worker`, `2 workers`.
pub(crate) fn workers_label(workers: usize) -> String {
    format!("{workers} worker{}", if workers == 1 { "" } else { "s" })
}

/// A white canvas of `size` pixels drawing into `path`.
fn canvas(path: &Path, size: (u32, u32)) -> Result<DrawingArea<SVGBackend<'_>, Shift>, Error> {
    let root = SVGBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE)?;
    Ok(root)
}

/// Bars of requests per second, four per worker count (a slot of 5 units each, the bars one unit apart), each
/// with its figure and its ratio to nginx above it, and nginx's level as a dashed line across its group.
#[allow(clippy::cast_precision_loss, reason = "small counts as coordinates")]
fn draw_throughput(path: &Path, charts: &Charts<'_>) -> Result<(), Error> {
    let groups = charts.throughput;
    let highest = groups
        .iter()
        .flat_map(|g| BARS.iter().filter_map(|(_, _, figure)| figure(g)))
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max);
    if groups.is_empty() || highest <= 0.0 {
        return Err("no throughput figures".into());
    }
    let root = canvas(path, (1000, 600))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Requests per second ({})", charts.throughput_source),
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(56)
        .y_label_area_size(72)
        // Headroom for the labels above the bars and for the legend.
        .build_cartesian_2d(0.0..5.0 * groups.len() as f64, 0.0..highest * 1.5)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_labels(8)
        .y_label_style(("sans-serif", 13))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .y_desc("requests/s (higher is better)")
        .x_desc("worker count (sidecar, nginx and bare hop alike)")
        .axis_desc_style(("sans-serif", 15))
        .draw()?;
    let value_style = TextStyle::from(("sans-serif", 13)).pos(Pos::new(HPos::Center, VPos::Bottom));
    let ratio_style = TextStyle::from(("sans-serif", 13).into_font().style(FontStyle::Bold))
        .pos(Pos::new(HPos::Center, VPos::Bottom));
    for (k, (name, colour, figure)) in BARS.iter().enumerate() {
        if !groups.iter().any(|g| figure(g).is_some_and(f64::is_finite)) {
            // Not measured (nginx missing, or no oha): no bars, and no legend entry.
            continue;
        }
        let bars = groups.iter().enumerate().filter_map(|(i, g)| {
            let value = figure(g).filter(|v| v.is_finite())?;
            let left = 5.0 * i as f64 + k as f64 + 0.6;
            Some(Rectangle::new(
                [(left, 0.0), (left + 0.8, value)],
                colour.filled(),
            ))
        });
        chart
            .draw_series(bars)?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], colour.filled()));
        // The figure above each bar, and above it the ratio to nginx of the same worker count.
        let labels = groups.iter().enumerate().filter_map(|(i, g)| {
            let value = figure(g).filter(|v| v.is_finite())?;
            let centre = 5.0 * i as f64 + k as f64 + 1.0;
            let ratio = g
                .nginx
                .filter(|n| *n > 0.0)
                .map_or(String::new(), |n| format!("{:.2}× nginx", value / n));
            Some(
                EmptyElement::at((centre, value))
                    + Text::new(
                        format!("{:.1}k", value / 1000.0),
                        (0, -4),
                        value_style.clone(),
                    )
                    + Text::new(ratio, (0, -20), ratio_style.clone()),
            )
        });
        chart.draw_series(labels)?;
    }
    // nginx's level across its group: the gap of every other bar to the reference at a glance.
    for (i, g) in groups.iter().enumerate() {
        if let Some(nginx) = g.nginx.filter(|v| v.is_finite()) {
            let start = 5.0 * i as f64;
            chart.draw_series(DashedLineSeries::new(
                [(start + 0.3, nginx), (start + 4.7, nginx)],
                6,
                4,
                BARS[1].1.stroke_width(1),
            ))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.4))
        .draw()?;
    // The worker count under each group, below the x axis.
    let group_style = TextStyle::from(("sans-serif", 16)).pos(Pos::new(HPos::Center, VPos::Top));
    for (i, g) in groups.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(5.0 * i as f64 + 2.5, 0.0));
        root.draw(&Text::new(
            workers_label(g.workers),
            (x, y + 8),
            group_style.clone(),
        ))?;
    }
    root.present()?;
    Ok(())
}

/// One line (with its points) per target over the percentiles, on a logarithmic latency axis (the tail is
/// ten times the median).
fn draw_latency(path: &Path, charts: &Charts<'_>) -> Result<(), Error> {
    let lines: Vec<(usize, &LatencyLine, [f64; 4])> = charts
        .latency
        .iter()
        .enumerate()
        .filter_map(|(i, line)| {
            let ms = line
                .ms
                .filter(|ms| ms.iter().all(|v| v.is_finite() && *v > 0.0))?;
            Some((i, line, ms))
        })
        .collect();
    let values = lines.iter().flat_map(|(_, _, ms)| ms.iter().copied());
    let (lowest, highest) = values.fold((f64::INFINITY, 0.0_f64), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if lines.is_empty() {
        return Err("no latency figures".into());
    }
    let root = canvas(path, (900, 560))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Latency at a fixed rate: {}", charts.latency_source),
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(
            // A segment per percentile (the range's end is one of them).
            (0..PERCENTILES.len() - 1).into_segmented(),
            (lowest / 1.5..highest * 2.0)
                .log_scale()
                .with_key_points(round_values(lowest / 1.5, highest * 2.0)),
        )?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => PERCENTILES
                .get(*i)
                .map_or(String::new(), |(name, _)| (*name).to_owned()),
            _ => String::new(),
        })
        .x_label_style(("sans-serif", 15))
        .y_label_style(("sans-serif", 13))
        .y_label_formatter(&|v| {
            if *v >= 1.0 {
                format!("{v:.0}")
            } else if *v >= 0.1 {
                format!("{v:.1}")
            } else {
                format!("{v:.2}")
            }
        })
        .y_desc("latency, ms (log scale; lower is better)")
        .x_desc("percentile")
        .axis_desc_style(("sans-serif", 15))
        .draw()?;
    let value_style = TextStyle::from(("sans-serif", 12)).pos(Pos::new(HPos::Left, VPos::Center));
    for (i, line, ms) in &lines {
        let colour = LINE_COLOURS.get(*i).copied().unwrap_or(BLACK);
        let points = ms
            .iter()
            .enumerate()
            .map(|(p, v)| (SegmentValue::CenterOf(p), *v));
        chart
            .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)).point_size(4))?
            .label(line.name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], colour.stroke_width(2)));
        // The figure beside each point.
        chart.draw_series(points.map(|(p, v)| {
            EmptyElement::at((p, v))
                + Text::new(format!("{v:.2}"), (8, -10), value_style.color(&colour))
        }))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.4))
        .draw()?;
    root.present()?;
    Ok(())
}

/// The round values (1, 2 and 5 times a power of ten) from `low` to `high`: the labelled lines of a
/// logarithmic axis.
fn round_values(low: f64, high: f64) -> Vec<f64> {
    let mut values = Vec::new();
    let mut decade = 10f64.powf(low.log10().floor());
    // Bounded: latencies in ms span a few decades.
    for _ in 0..12 {
        if decade > high {
            break;
        }
        for step in [1.0, 2.0, 5.0] {
            let value = decade * step;
            if (low..=high).contains(&value) {
                values.push(value);
            }
        }
        decade *= 10.0;
    }
    values
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both charts of a full run (two worker counts, every target), and of a run without nginx
    /// (`OBO_BENCH_KEEP_CHARTS=1` keeps them in the temporary directory, to look at).
    #[test]
    fn draws_both_charts_with_and_without_nginx() {
        let dir = std::env::temp_dir().join(format!("obo-sidecar-charts-{}", std::process::id()));
        let group = |workers, nginx, scale| ThroughputGroup {
            workers,
            direct: Some(125_283.0),
            nginx,
            bare: Some(47_222.0 * scale),
            hit: Some(33_799.0 * scale),
        };
        let full = [group(1, Some(58_740.0), 0.8), group(2, Some(90_120.0), 1.4)];
        let latency = [
            LatencyLine {
                name: "direct upstream (no proxy)",
                ms: Some([0.06, 0.12, 0.29, 0.8]),
            },
            LatencyLine {
                name: "nginx proxy hop",
                ms: Some([0.12, 0.2, 0.4, 2.04]),
            },
            LatencyLine {
                name: "sidecar, cache hit",
                ms: Some([0.81, 1.3, 2.93, 4.33]),
            },
        ];
        let charts = Charts {
            throughput_source: "oha, 32 connections, median of 3".to_owned(),
            throughput: &full,
            latency_source: "1000 requests/s (oha -q, 16 connections, 1 worker)".to_owned(),
            latency: &latency,
        };
        let written = write(&dir.join("full"), &charts);
        assert_eq!(written.len(), 2);
        for path in &written {
            let svg = std::fs::read_to_string(path).unwrap();
            assert!(svg.contains("nginx"), "{svg}");
        }
        let without = [group(1, None, 0.8)];
        let latency = [
            LatencyLine {
                name: "direct upstream (no proxy)",
                ms: Some([0.06, 0.12, 0.29, 0.8]),
            },
            LatencyLine {
                name: "nginx proxy hop",
                ms: None,
            },
        ];
        let charts = Charts {
            throughput: &without,
            latency: &latency,
            ..charts
        };
        assert_eq!(write(&dir.join("partial"), &charts).len(), 2);
        assert_eq!(round_values(0.04, 1.0), [0.05, 0.1, 0.2, 0.5, 1.0]);
        if std::env::var_os("OBO_BENCH_KEEP_CHARTS").is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}
