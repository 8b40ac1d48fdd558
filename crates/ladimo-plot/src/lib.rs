//! SVG charts for ladimo's reports, drawn with `plotters` from plain data (no ladimo types).
//!
//! - [`line_chart`]: named series of `(x, y)` points as lines with markers on the points (cost
//!   curves, a Pareto frontier), optionally with a log y axis.
//! - [`histograms`]: a grid of small titled histograms from precomputed bin counts (one per layer).
//!
//! Only the SVG backend is built: text becomes `<text>` elements whose size is estimated, so no
//! system fonts are needed. The SVG is rendered in memory, written to a temporary file next to the
//! target and renamed over it, so a failed or interrupted run never leaves half a chart.

use std::ops::Range;
use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;

/// One line of a [`line_chart`]: drawn in the order given (sort by x first for a curve).
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend entry; empty for none.
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("chart {path}: {message}")]
    InvalidInput { path: PathBuf, message: String },
    #[error("chart {path}: drawing failed: {message}")]
    Draw { path: PathBuf, message: String },
    #[error("chart {path}: writing failed: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

const FONT: &str = "sans-serif";

/// A line chart of `series` with a legend, written as SVG to `path`. Every point must be finite;
/// with `log_y` every y must also be positive (an error names the series and point otherwise).
/// Series with no points are skipped, but at least one point is needed.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_y: bool,
) -> Result<(), PlotError> {
    let invalid = |message: String| PlotError::InvalidInput {
        path: path.to_path_buf(),
        message,
    };
    for s in series {
        for (i, &(x, y)) in s.points.iter().enumerate() {
            if !x.is_finite() || !y.is_finite() {
                return Err(invalid(format!(
                    "series {:?}, point {i}: ({x}, {y}) is not finite",
                    s.name
                )));
            }
            if log_y && y <= 0.0 {
                return Err(invalid(format!(
                    "series {:?}, point {i}: y = {y} cannot be drawn on a log y axis (must be > 0)",
                    s.name
                )));
            }
        }
    }
    let all = || series.iter().flat_map(|s| s.points.iter().copied());
    if all().next().is_none() {
        return Err(invalid("no points to draw".into()));
    }
    let x = padded(all().map(|p| p.0), false);
    let y = padded(all().map(|p| p.1), log_y);

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (960, 640)).into_drawing_area();
        let drawn = if log_y {
            draw_lines(&root, title, x_label, y_label, series, x, y.log_scale())
        } else {
            draw_lines(&root, title, x_label, y_label, series, x, y)
        };
        drawn
            .and_then(|()| root.present().map_err(|e| e.to_string()))
            .map_err(|message| PlotError::Draw {
                path: path.to_path_buf(),
                message,
            })?;
    }
    write_atomic(path, &svg)
}

fn draw_lines<Y>(
    root: &DrawingArea<SVGBackend, Shift>,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    x: Range<f64>,
    y: Y,
) -> Result<(), String>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(root)
        .caption(title, (FONT, 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(x, y)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 15))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(|e| e.to_string())?;
    let mut legend = false;
    for (i, s) in series.iter().enumerate().filter(|(_, s)| !s.points.is_empty()) {
        let color = Palette99::pick(i).to_rgba();
        let drawn = chart
            .draw_series(LineSeries::new(s.points.iter().copied(), color.stroke_width(2)).point_size(3))
            .map_err(|e| e.to_string())?;
        if !s.name.is_empty() {
            legend = true;
            drawn
                .label(s.name.as_str())
                .legend(move |(lx, ly)| PathElement::new(vec![(lx, ly), (lx + 20, ly)], color.stroke_width(2)));
        }
    }
    if legend {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font((FONT, 13))
            .draw()
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The range of `values` with a margin (5%, multiplicative on a log axis); a single value gets a
/// range around it.
fn padded(values: impl Iterator<Item = f64>, log: bool) -> Range<f64> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if log {
        let (lo, hi) = if lo == hi { (lo / 2.0, hi * 2.0) } else { (lo, hi) };
        let f = (hi / lo).powf(0.05);
        (lo / f)..(hi * f)
    } else {
        let span = if lo == hi { lo.abs().max(1.0) } else { hi - lo };
        (lo - 0.05 * span)..(hi + 0.05 * span)
    }
}

/// A grid of small histograms, `columns` wide, under one `title`, written as SVG to `path`. Each
/// panel is `(panel title, bin counts, (x_min, x_max))`: the bins split the x range evenly. Counts
/// must be finite and `>= 0`, ranges finite with `x_min < x_max`.
pub fn histograms(
    path: &Path,
    title: &str,
    x_label: &str,
    panels: &[(String, Vec<f64>, (f64, f64))],
    columns: usize,
) -> Result<(), PlotError> {
    let invalid = |message: String| PlotError::InvalidInput {
        path: path.to_path_buf(),
        message,
    };
    if columns == 0 {
        return Err(invalid("columns must be at least 1".into()));
    }
    if panels.is_empty() {
        return Err(invalid("no panels to draw".into()));
    }
    for (name, counts, (lo, hi)) in panels {
        if counts.is_empty() {
            return Err(invalid(format!("panel {name:?}: no bins")));
        }
        if let Some((i, c)) = counts.iter().enumerate().find(|(_, c)| !c.is_finite() || **c < 0.0) {
            return Err(invalid(format!(
                "panel {name:?}, bin {i}: count {c} is not a finite number >= 0"
            )));
        }
        if !lo.is_finite() || !hi.is_finite() || lo >= hi {
            return Err(invalid(format!(
                "panel {name:?}: x range ({lo}, {hi}) must be finite with min < max"
            )));
        }
    }
    let columns = columns.min(panels.len());
    let rows = panels.len().div_ceil(columns);
    let (w, h) = (columns as u32 * 320, rows as u32 * 240 + 60);

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area();
        let drawn = draw_histograms(&root, title, x_label, panels, rows, columns)
            .and_then(|()| root.present().map_err(|e| e.to_string()));
        drawn.map_err(|message| PlotError::Draw {
            path: path.to_path_buf(),
            message,
        })?;
    }
    write_atomic(path, &svg)
}

fn draw_histograms(
    root: &DrawingArea<SVGBackend, Shift>,
    title: &str,
    x_label: &str,
    panels: &[(String, Vec<f64>, (f64, f64))],
    rows: usize,
    columns: usize,
) -> Result<(), String> {
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let body = root.titled(title, (FONT, 24)).map_err(|e| e.to_string())?;
    let color = Palette99::pick(0).to_rgba();
    for ((name, counts, (lo, hi)), area) in panels.iter().zip(body.split_evenly((rows, columns))) {
        let top = counts.iter().copied().fold(0.0, f64::max);
        let top = if top > 0.0 { top * 1.05 } else { 1.0 };
        let mut chart = ChartBuilder::on(&area)
            .caption(name, (FONT, 14))
            .margin(8)
            .x_label_area_size(36)
            .y_label_area_size(44)
            .build_cartesian_2d(*lo..*hi, 0.0..top)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(4)
            .y_labels(4)
            .x_desc(x_label)
            .label_style((FONT, 10))
            .axis_desc_style((FONT, 11))
            .light_line_style(RGBColor(240, 240, 240))
            .draw()
            .map_err(|e| e.to_string())?;
        let width = (hi - lo) / counts.len() as f64;
        chart
            .draw_series(counts.iter().enumerate().filter(|(_, c)| **c > 0.0).map(|(i, &c)| {
                let left = lo + width * i as f64;
                Rectangle::new([(left, 0.0), (left + width, c)], color.filled())
            }))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Writes `contents` to `path` atomically (`ladimo_io::atomic`).
fn write_atomic(path: &Path, contents: &str) -> Result<(), PlotError> {
    ladimo_io::atomic::write_atomic(path, contents.as_bytes()).map_err(|e| {
        let (path, source) = e.into_io();
        PlotError::Io { path, source }
    })
}
