//! `forge-node plot`: training and validation loss of one or several runs against tokens, as a
//! PNG. Reads a run's `metrics.jsonl` (`forge-node train`) or `rounds.jsonl` (`forge-node join`;
//! its tokens are the whole group's).

use anyhow::{Context, Result, bail};
use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// The font the labels are drawn with, built into the binary (no system fonts needed).
const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Run colours that stay apart on white (matplotlib's tab10).
const COLORS: [(u8, u8, u8); 8] = [
    (31, 119, 180),
    (214, 39, 40),
    (44, 160, 44),
    (148, 103, 189),
    (255, 127, 14),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
];

/// One run's curves: (tokens, loss) points.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Curves {
    pub(crate) name: String,
    pub(crate) train: Vec<(f64, f64)>,
    pub(crate) val: Vec<(f64, f64)>,
}

/// Reads a run folder: `metrics.jsonl` or `rounds.jsonl` in it, or in its `run/` (a join
/// workdir). `smooth` in [0, 1) is the training curve's exponential smoothing (0: none).
pub(crate) fn read_run(dir: &Path, smooth: f64) -> Result<Curves> {
    let candidates = [
        dir.join("metrics.jsonl"),
        dir.join("rounds.jsonl"),
        dir.join("run/metrics.jsonl"),
        dir.join("run/rounds.jsonl"),
    ];
    let Some(file) = candidates.iter().find(|p| p.is_file()) else {
        bail!(
            "{}: no metrics.jsonl (forge-node train) or rounds.jsonl (forge-node join) in it or \
             in its run/; give the run's out_dir or the node's --workdir",
            dir.display()
        );
    };
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let rounds = file.ends_with("rounds.jsonl");
    // A round's loss is already the mean of its H inner steps: smoothing it again would lag.
    let smooth = if rounds { 0.0 } else { smooth };
    let mut curves = Curves {
        // The folder's name as given (`.` and `..` by where they lead).
        name: dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .or_else(|| {
                let real = dir.canonicalize().ok()?;
                Some(real.file_name()?.to_string_lossy().into_owned())
            })
            .unwrap_or_else(|| dir.display().to_string()),
        ..Curves::default()
    };
    let mut group_tokens = 0.0;
    let mut smoothed: Option<f64> = None;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        // A line cut by a crash mid-write ends the file; anything else malformed is an error.
        let Ok(row) = serde_json::from_str::<serde_json::Value>(line) else {
            if i + 1 == text.lines().count() {
                break;
            }
            bail!("{} line {}: not JSON", file.display(), i + 1);
        };
        let number = |key: &str| row.get(key).and_then(serde_json::Value::as_f64);
        let tokens = if rounds {
            // Only committed rounds moved the model.
            let committed = row
                .get("outcome")
                .and_then(|o| o.as_str())
                .is_some_and(|o| o.starts_with("committed"));
            if !committed {
                continue;
            }
            group_tokens += number("group_tokens").or(number("tokens")).unwrap_or(0.0);
            group_tokens
        } else {
            match number("tokens") {
                Some(t) => t,
                None => continue,
            }
        };
        if let Some(loss) = number("loss").filter(|l| l.is_finite()) {
            let s = match smoothed {
                Some(prev) => smooth * prev + (1.0 - smooth) * loss,
                None => loss,
            };
            smoothed = Some(s);
            curves.train.push((tokens, s));
        }
        if let Some(val) = number("eval_loss").filter(|l| l.is_finite()) {
            curves.val.push((tokens, val));
        }
    }
    if curves.train.is_empty() && curves.val.is_empty() {
        bail!("{}: no losses in it yet", file.display());
    }
    Ok(curves)
}

/// Draws `runs` into the PNG `out`: each run one colour, its smoothed training loss a line,
/// its validation losses points joined by a thinner line.
pub(crate) fn draw(runs: &[Curves], out: &Path, title: &str) -> Result<()> {
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| anyhow::anyhow!("the built-in font does not load"))?;
    let points = || runs.iter().flat_map(|r| r.train.iter().chain(&r.val));
    let (x_max, mut y_min, mut y_max) = points().fold(
        (0.0f64, f64::INFINITY, f64::NEG_INFINITY),
        |(x, lo, hi), &(t, l)| (x.max(t), lo.min(l), hi.max(l)),
    );
    if !y_min.is_finite() {
        bail!("nothing to plot");
    }
    let pad = ((y_max - y_min) * 0.05).max(0.01);
    y_min -= pad;
    y_max += pad;
    let root = BitMapBackend::new(out, (1200, 750)).into_drawing_area();
    let fail = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing {}: {e}", out.display());
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 28))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max.max(1.0) * 1.02, y_min..y_max)
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc("tokens")
        .y_desc("loss (nats per token)")
        .x_label_formatter(&|x| format_tokens(*x))
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .draw()
        .map_err(|e| fail(&e))?;
    for (i, run) in runs.iter().enumerate() {
        let (r, g, b) = COLORS[i % COLORS.len()];
        let color = RGBColor(r, g, b).to_rgba();
        chart
            .draw_series(LineSeries::new(
                run.train.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(|e| fail(&e))?
            .label(format!("{} train", run.name))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        if !run.val.is_empty() {
            chart
                .draw_series(LineSeries::new(
                    run.val.iter().copied(),
                    color.stroke_width(1),
                ))
                .map_err(|e| fail(&e))?;
            chart
                .draw_series(run.val.iter().map(|&p| Circle::new(p, 5, color.filled())))
                .map_err(|e| fail(&e))?
                .label(format!("{} validation", run.name))
                .legend(move |(x, y)| Circle::new((x + 10, y), 5, color.filled()));
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))?;
    Ok(())
}

/// 1.2M, 350K, 900.
fn format_tokens(x: f64) -> String {
    if x >= 1e9 {
        format!("{:.1}B", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.1}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.0}K", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

/// `forge-node plot RUN_DIR... -o OUT`.
pub(crate) fn plot(dirs: &[PathBuf], out: &Path, smooth: f64) -> Result<()> {
    if !(0.0..1.0).contains(&smooth) {
        bail!("--smooth {smooth}: give a value in [0, 1) (0: no smoothing; 0.9: strong)");
    }
    let runs = dirs
        .iter()
        .map(|d| read_run(d, smooth))
        .collect::<Result<Vec<_>>>()?;
    draw(&runs, out, "loss against tokens")?;
    println!(
        "wrote {} ({} run{})",
        out.display(),
        runs.len(),
        if runs.len() == 1 { "" } else { "s" }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A train run's metrics and a DiLoCo node's rounds (tokens of the whole group, committed
    /// rounds only, a line cut by a crash at the end) become curves, and the PNG has them.
    #[test]
    fn runs_of_both_kinds_are_read_and_drawn() {
        let dir = tempfile::tempdir().unwrap();
        let train = dir.path().join("single");
        std::fs::create_dir(&train).unwrap();
        let mut metrics = String::new();
        for step in 1..=40 {
            let loss = 6.0 - step as f64 * 0.05;
            let eval = if step % 10 == 0 {
                format!(", \"eval_loss\": {}", loss + 0.1)
            } else {
                String::new()
            };
            metrics += &format!(
                "{{\"step\": {step}, \"tokens\": {}, \"loss\": {loss}{eval}}}\n",
                step * 2048
            );
        }
        std::fs::write(train.join("metrics.jsonl"), metrics).unwrap();
        let node = dir.path().join("node0");
        std::fs::create_dir_all(node.join("run")).unwrap();
        std::fs::write(
            node.join("run/rounds.jsonl"),
            "{\"round\": 1, \"tokens\": 100, \"group_tokens\": 200.0, \"loss\": 6.0, \"outcome\": \"committed v1 ab\"}\n\
             {\"round\": 2, \"tokens\": 200, \"group_tokens\": 200.0, \"loss\": 9.0, \"outcome\": \"abandoned: timeout\"}\n\
             {\"round\": 2, \"tokens\": 200, \"group_tokens\": 200.0, \"loss\": 5.0, \"eval_loss\": 5.5, \"outcome\": \"committed v2 cd\"}\n\
             {\"round\": 3, \"tok",
        )
        .unwrap();
        let single = read_run(&train, 0.0).unwrap();
        assert_eq!(single.name, "single");
        assert_eq!(single.train.len(), 40);
        assert_eq!(single.val.len(), 4);
        assert_eq!(single.train[0], (2048.0, 5.95));
        let smoothed = read_run(&train, 0.5).unwrap();
        assert!((smoothed.train[1].1 - (0.5 * 5.95 + 0.5 * 5.9)).abs() < 1e-12);
        let group = read_run(&node, 0.0).unwrap();
        assert_eq!(group.train, [(200.0, 6.0), (400.0, 5.0)]);
        assert_eq!(group.val, [(400.0, 5.5)]);

        let png = dir.path().join("loss.png");
        plot(&[train, node], &png, 0.6).unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
        assert!(
            bytes.len() > 10_000,
            "{} bytes: an empty picture?",
            bytes.len()
        );

        let err = plot(&[dir.path().to_path_buf()], &png, 0.6).unwrap_err();
        assert!(err.to_string().contains("no metrics.jsonl"), "{err}");
        let err = plot(&[dir.path().join("single")], &png, 1.0).unwrap_err();
        assert!(err.to_string().contains("--smooth"), "{err}");
    }
}
