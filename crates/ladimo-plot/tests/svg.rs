//! Charts are written as valid SVG files, atomically, and bad input is a clear error.

use ladimo_plot::{PlotError, Series, histograms, line_chart};

fn read_svg(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let head = text.trim_start();
    assert!(
        head.starts_with("<svg") || head.starts_with("<?xml"),
        "not SVG: {}",
        &text[..text.len().min(80)]
    );
    assert!(text.trim_end().ends_with("</svg>"), "SVG not closed");
    text
}

fn no_temp_files(dir: &std::path::Path) {
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
}

fn curves() -> Vec<Series> {
    vec![
        Series {
            name: "top-k".into(),
            points: (1..=8).map(|k| (k as f64, 1.0 / k as f64)).collect(),
        },
        Series {
            name: "frontier".into(),
            points: vec![(1.5, 0.7), (3.0, 0.2), (6.0, 0.05)],
        },
        Series {
            name: String::new(),
            points: vec![],
        },
    ]
}

#[test]
fn line_chart_writes_svg_with_title_and_legend() {
    let dir = tempfile::tempdir().unwrap();
    for log_y in [false, true] {
        let path = dir.path().join(format!("cost_{log_y}.svg"));
        line_chart(
            &path,
            "Cost per budget",
            "active params / token",
            "loss",
            &curves(),
            log_y,
        )
        .unwrap();
        let svg = read_svg(&path);
        for text in ["Cost per budget", "active params / token", "loss", "top-k", "frontier"] {
            assert!(svg.contains(text), "missing {text:?}");
        }
        assert!(svg.contains("<circle"), "points have markers");
    }
    no_temp_files(dir.path());
}

#[test]
fn line_chart_overwrites_an_existing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.svg");
    std::fs::write(&path, "old").unwrap();
    let one = vec![Series {
        name: "a".into(),
        points: vec![(2.0, 3.0)],
    }];
    line_chart(&path, "Single point", "x", "y", &one, false).unwrap();
    assert!(read_svg(&path).contains("Single point"));
    no_temp_files(dir.path());
}

#[test]
fn log_y_with_non_positive_values_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.svg");
    let series = vec![Series {
        name: "bad".into(),
        points: vec![(1.0, 1.0), (2.0, 0.0)],
    }];
    let err = line_chart(&path, "t", "x", "y", &series, true).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, PlotError::InvalidInput { .. }), "{msg}");
    assert!(
        msg.contains("log") && msg.contains("\"bad\"") && msg.contains("log.svg"),
        "{msg}"
    );
    assert!(!path.exists(), "nothing written on error");
    // The same data on a linear axis is fine.
    line_chart(&path, "t", "x", "y", &series, false).unwrap();
}

#[test]
fn line_chart_rejects_no_points_and_non_finite_values() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.svg");
    assert!(matches!(
        line_chart(&path, "t", "x", "y", &[], false),
        Err(PlotError::InvalidInput { .. })
    ));
    let nan = vec![Series {
        name: "n".into(),
        points: vec![(f64::NAN, 1.0)],
    }];
    let msg = line_chart(&path, "t", "x", "y", &nan, false).unwrap_err().to_string();
    assert!(msg.contains("not finite") && msg.contains("x.svg"), "{msg}");
}

#[test]
fn write_errors_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    // A missing folder is created (atomic writes make their parent); a file where the folder
    // should be cannot be, and the error names it.
    std::fs::write(dir.path().join("a_file"), "x").unwrap();
    let path = dir.path().join("a_file").join("c.svg");
    let err = line_chart(&path, "t", "x", "y", &curves(), false).unwrap_err();
    assert!(matches!(err, PlotError::Io { .. }), "{err}");
    assert!(err.to_string().contains("a_file"), "{err}");
}

#[test]
fn histograms_write_a_titled_grid() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("layers.svg");
    let panels: Vec<(String, Vec<f64>, (f64, f64))> = (0..30)
        .map(|l| {
            let counts = (0..16).map(|b| ((b * 7 + l * 3) % 11) as f64).collect();
            (format!("layer {l}"), counts, (0.0, 1.0))
        })
        .collect();
    histograms(&path, "Router confidence", "max prob", &panels, 6).unwrap();
    let svg = read_svg(&path);
    for text in ["Router confidence", "layer 0", "layer 29", "max prob"] {
        assert!(svg.contains(text), "missing {text:?}");
    }
    assert!(svg.contains("<rect"), "bars drawn");
    no_temp_files(dir.path());
    // All-zero counts and more columns than panels are fine.
    let one = vec![("empty".to_string(), vec![0.0; 4], (-1.0, 1.0))];
    histograms(&path, "Zero", "x", &one, 4).unwrap();
    assert!(read_svg(&path).contains("empty"));
}

#[test]
fn histograms_reject_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h.svg");
    let ok = vec![("a".to_string(), vec![1.0, 2.0], (0.0, 1.0))];
    assert!(matches!(
        histograms(&path, "t", "x", &ok, 0),
        Err(PlotError::InvalidInput { .. })
    ));
    assert!(matches!(
        histograms(&path, "t", "x", &[], 2),
        Err(PlotError::InvalidInput { .. })
    ));
    for bad in [
        vec![("a".to_string(), vec![], (0.0, 1.0))],
        vec![("a".to_string(), vec![-1.0], (0.0, 1.0))],
        vec![("a".to_string(), vec![f64::NAN], (0.0, 1.0))],
        vec![("a".to_string(), vec![1.0], (1.0, 1.0))],
        vec![("a".to_string(), vec![1.0], (0.0, f64::INFINITY))],
    ] {
        let err = histograms(&path, "t", "x", &bad, 1).unwrap_err();
        assert!(
            err.to_string().contains("h.svg") && err.to_string().contains("\"a\""),
            "{err}"
        );
    }
    assert!(!path.exists());
}
