//! Training metrics: `metrics.jsonl` (one JSON object per optimizer step)
//! and SVG plots of it (loss curve) or of any x/y series (perplexity
//! against context length).

use crate::{Error, Result};
use serde::{Deserialize, Deserializer, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

/// One line of `metrics.jsonl`. `step` counts optimizer steps done (1 after
/// the first update). A non-finite value is written as `null` (JSON has no
/// NaN) and read back as NaN.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: u64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub loss: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub lr: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub grad_norm: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub step_time_s: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub tokens_per_s: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub elapsed_s: f64,
}

fn f64_or_nan<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Appends [`StepMetrics`] to a `metrics.jsonl`, one flushed line per step,
/// so a crash loses at most the line being written.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Starts a new log at `path` (an existing file is emptied).
    pub fn create(path: &Path) -> Result<MetricsLog> {
        let file = File::create(path).map_err(|e| Error::io(path, e))?;
        Ok(MetricsLog {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Continues the log of a run resumed from the checkpoint of step
    /// `step`: lines of later steps (written after that checkpoint, before
    /// the interruption) and a half-written last line are dropped, so the
    /// finished file equals that of an uninterrupted run. A missing file
    /// starts empty.
    pub fn resume(path: &Path, step: u64) -> Result<MetricsLog> {
        let kept = if path.exists() {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            let mut kept = String::new();
            for line in text.lines() {
                match serde_json::from_str::<StepMetrics>(line) {
                    Ok(m) if m.step <= step => {
                        kept.push_str(line);
                        kept.push('\n');
                    }
                    _ => {}
                }
            }
            kept
        } else {
            String::new()
        };
        let tmp = path.with_file_name(format!(
            ".{}.tmp",
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "metrics.jsonl".into())
        ));
        std::fs::write(&tmp, kept).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(MetricsLog {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Appends one step's line and flushes it.
    pub fn append(&mut self, m: &StepMetrics) -> Result<()> {
        let mut line = serde_json::to_string(m)
            .map_err(|e| Error::invalid(format!("cannot encode metrics: {e}")))?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Every step of a `metrics.jsonl`. A half-written last line (a crash) is
/// skipped; any other malformed line is an error.
pub fn read_metrics(path: &Path) -> Result<Vec<StepMetrics>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let lines: Vec<String> = BufReader::new(file)
        .lines()
        .collect::<std::io::Result<_>>()
        .map_err(|e| Error::io(path, e))?;
    let mut out = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<StepMetrics>(line) {
            Ok(m) => out.push(m),
            Err(_) if i + 1 == lines.len() => {}
            Err(e) => {
                return Err(Error::format(
                    path,
                    format!("line {}: not a metrics record: {e}", i + 1),
                ))
            }
        }
    }
    Ok(out)
}

/// A named line of a plot.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// The loss curve (loss against step) of a `metrics.jsonl` as an SVG.
pub fn plot_loss(metrics_jsonl: &Path, svg_out: &Path) -> Result<()> {
    let steps = read_metrics(metrics_jsonl)?;
    let series = Series {
        name: "training loss".into(),
        points: steps.iter().map(|m| (m.step as f64, m.loss)).collect(),
    };
    plot_xy(
        &[series],
        svg_out,
        "Training loss",
        "optimizer step",
        "loss",
    )
}

/// Lines of x/y points as an SVG (800×500), with axes, a title and a
/// legend. Non-finite points are left out. Text is SVG `<text>` laid out
/// with plotters' built-in estimate, so no font files are needed.
pub fn plot_xy(
    series: &[Series],
    svg_out: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
) -> Result<()> {
    use plotters::prelude::*;
    let finite: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|s| {
            s.points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect()
        })
        .collect();
    let all = finite.iter().flatten();
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    let mut any = false;
    for &(x, y) in all {
        any = true;
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if !any {
        return Err(Error::invalid(format!(
            "nothing to plot in {}: no finite points",
            svg_out.display()
        )));
    }
    // A flat or single-point series still needs a non-empty range.
    if x1 - x0 <= 0.0 {
        (x0, x1) = (x0 - 1.0, x1 + 1.0);
    }
    let pad = if y1 - y0 > 0.0 { (y1 - y0) * 0.05 } else { 1.0 };
    (y0, y1) = (y0 - pad, y1 + pad);

    let fail =
        |e: String| Error::invalid(format!("{}: cannot draw the plot: {e}", svg_out.display()));
    let root = SVGBackend::new(svg_out, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| fail(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .draw()
        .map_err(|e| fail(e.to_string()))?;
    for (i, (s, pts)) in series.iter().zip(finite).enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(|e| fail(e.to_string()))?
            .label(s.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| fail(e.to_string()))?;
    root.present().map_err(|e| fail(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(step: u64, loss: f64) -> StepMetrics {
        StepMetrics {
            step,
            loss,
            lr: 2e-5,
            grad_norm: 0.5,
            step_time_s: 0.25,
            tokens_per_s: 4096.0,
            elapsed_s: step as f64 * 0.25,
        }
    }

    #[test]
    fn jsonl_round_trip_with_exact_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::create(&p).unwrap();
        for s in 1..=3 {
            log.append(&m(s, 5.0 - s as f64)).unwrap();
        }
        log.append(&m(4, f64::NAN)).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        let mut keys: Vec<&str> = first
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "elapsed_s",
                "grad_norm",
                "loss",
                "lr",
                "step",
                "step_time_s",
                "tokens_per_s"
            ]
        );
        let back = read_metrics(&p).unwrap();
        assert_eq!(back[..3], [m(1, 4.0), m(2, 3.0), m(3, 2.0)]);
        assert!(back[3].loss.is_nan());
    }

    #[test]
    fn resume_truncates_later_steps() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::create(&p).unwrap();
        for s in 1..=5 {
            log.append(&m(s, 1.0)).unwrap();
        }
        drop(log);
        // A crash mid-line.
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"step\":6,\"lo").unwrap();
        drop(f);
        assert_eq!(read_metrics(&p).unwrap().len(), 5);
        let mut log = MetricsLog::resume(&p, 3).unwrap();
        log.append(&m(4, 9.0)).unwrap();
        let steps: Vec<u64> = read_metrics(&p).unwrap().iter().map(|x| x.step).collect();
        assert_eq!(steps, [1, 2, 3, 4]);
        assert_eq!(read_metrics(&p).unwrap()[3].loss, 9.0);
        let q = dir.path().join("new.jsonl");
        MetricsLog::resume(&q, 10).unwrap();
        assert!(read_metrics(&q).unwrap().is_empty());
        std::fs::write(&q, "garbage\n{}\n").unwrap();
        assert!(read_metrics(&q).is_err());
    }

    #[test]
    fn plots_are_svg() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::create(&p).unwrap();
        for s in 1..=20 {
            log.append(&m(s, 6.0 / s as f64)).unwrap();
        }
        let svg = dir.path().join("loss.svg");
        plot_loss(&p, &svg).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(
            text.trim_start().starts_with("<svg"),
            "{}",
            &text[..100.min(text.len())]
        );
        assert!(text.contains("<polyline") || text.contains("<path"));
        assert!(text.contains("Training loss"));
        assert!(text.trim_end().ends_with("</svg>"));

        let ppl = dir.path().join("ppl.svg");
        let series = vec![
            Series {
                name: "base".into(),
                points: vec![(1024.0, 9.0), (2048.0, 8.5), (4096.0, f64::INFINITY)],
            },
            Series {
                name: "LongLoRA".into(),
                points: vec![(1024.0, 8.0), (2048.0, 7.5), (4096.0, 7.2)],
            },
        ];
        plot_xy(&series, &ppl, "Perplexity", "context", "ppl").unwrap();
        let text = std::fs::read_to_string(&ppl).unwrap();
        assert!(text.contains("LongLoRA") && text.contains("<svg"));
        let one = vec![Series {
            name: "x".into(),
            points: vec![(1.0, 1.0)],
        }];
        plot_xy(&one, &dir.path().join("one.svg"), "t", "x", "y").unwrap();
        let none = vec![Series {
            name: "x".into(),
            points: vec![(1.0, f64::NAN)],
        }];
        assert!(plot_xy(&none, &dir.path().join("none.svg"), "t", "x", "y").is_err());
    }
}
