//! Run metrics: one JSON object per line in `metrics.jsonl`, and what a person watching sees
//! (a progress bar with ETA on a terminal, plain log lines otherwise).

use crate::error::{Error, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::Path;

/// One line of `metrics.jsonl`. Eval fields are present on eval steps only.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: u64,
    pub tokens: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Tokens per second of the step's compute alone.
    pub tokens_per_s: f64,
    /// Tokens per second of wall clock since the previous line: evals, checkpoints and
    /// everything else between steps included.
    #[serde(default)]
    pub wall_tokens_per_s: f64,
    /// Where this process's wall clock went so far (seconds).
    #[serde(default)]
    pub phases: Phases,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_bpb: Option<f64>,
    pub elapsed_s: f64,
}

/// A run's wall clock by what it was spent on (seconds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Phases {
    /// Training steps: data, forward, backward, gradient exchange and optimizer.
    pub step_s: f64,
    pub eval_s: f64,
    /// Saving checkpoints: the copy, or the whole write when it is done in the step, and any
    /// wait for a background write.
    pub checkpoint_s: f64,
    /// Everything else: metrics, logging, the divergence guard.
    pub other_s: f64,
}

impl Phases {
    /// "step 95.1%, eval 3.2%, checkpoint 1.4%, other 0.3%".
    pub fn shares(&self) -> String {
        let total = (self.step_s + self.eval_s + self.checkpoint_s + self.other_s).max(1e-9);
        format!(
            "step {:.1}%, eval {:.1}%, checkpoint {:.1}%, other {:.1}%",
            100.0 * self.step_s / total,
            100.0 * self.eval_s / total,
            100.0 * self.checkpoint_s / total,
            100.0 * self.other_s / total
        )
    }
}

/// Appends metrics to a JSONL file and shows progress.
#[derive(Debug)]
pub struct MetricsLog {
    file: File,
    bar: Option<ProgressBar>,
    log_every: u64,
    /// Tokens and elapsed seconds at the last progress line, whose wall-clock tokens/s the next
    /// line reports over the steps between them.
    shown: Option<(u64, f64)>,
}

impl MetricsLog {
    /// Opens (appending, so a resumed run continues the same file) `path`.
    pub fn open(path: &Path, total_steps: u64, start_step: u64, log_every: u64) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(Error::io(format!("opening metrics log {}", path.display())))?;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total_steps);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} steps [{elapsed_precise} < {eta_precise}] {msg}",
                )
                .expect("static template"),
            );
            bar.set_position(start_step);
            bar
        });
        Ok(MetricsLog {
            file,
            bar,
            log_every: log_every.max(1),
            shown: None,
        })
    }

    pub fn record(&mut self, m: &StepMetrics) -> Result<()> {
        let mut line = serde_json::to_string(m).expect("metrics serialize");
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .map_err(Error::io("writing metrics.jsonl"))?;
        let eval = m
            .eval_loss
            .map(|l| {
                format!(
                    " eval_loss {l:.4} bpb {:.4}",
                    m.eval_bpb.unwrap_or(f64::NAN)
                )
            })
            .unwrap_or_default();
        let shows = m.step.is_multiple_of(self.log_every) || m.eval_loss.is_some();
        // Wall-clock tokens/s since the last line shown (evals and checkpoints between included).
        let wall = match self.shown {
            Some((tokens, elapsed)) if m.elapsed_s > elapsed => {
                (m.tokens - tokens) as f64 / (m.elapsed_s - elapsed)
            }
            _ => m.wall_tokens_per_s,
        };
        if shows {
            self.shown = Some((m.tokens, m.elapsed_s));
        }
        let summary = format!(
            "loss {:.4} lr {:.2e} gnorm {:.3} {:.0} tok/s, {wall:.0} tok/s of wall clock{eval}",
            m.loss, m.lr, m.grad_norm, m.tokens_per_s
        );
        match &self.bar {
            Some(bar) => {
                bar.set_position(m.step);
                bar.set_message(summary);
                if m.eval_loss.is_some() {
                    bar.println(format!("step {} {}", m.step, bar.message()));
                }
            }
            None if m.step.is_multiple_of(self.log_every) || m.eval_loss.is_some() => {
                tracing::info!("step {} {summary}", m.step);
            }
            None => {}
        }
        Ok(())
    }

    /// Prints a line without breaking the progress bar.
    pub fn note(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => tracing::info!("{text}"),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

/// Reads a metrics file back (for tests, benchmarks and the demo).
pub fn read_metrics(path: &Path) -> Result<Vec<StepMetrics>> {
    let text =
        std::fs::read_to_string(path).map_err(Error::io(format!("reading {}", path.display())))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).map_err(|e| Error::Config {
                path: path.to_path_buf(),
                why: format!("bad metrics line: {e}"),
            })
        })
        .collect()
}
