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
    pub tokens_per_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_bpb: Option<f64>,
    pub elapsed_s: f64,
}

/// Appends metrics to a JSONL file and shows progress.
#[derive(Debug)]
pub struct MetricsLog {
    file: File,
    bar: Option<ProgressBar>,
    log_every: u64,
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
        let summary = format!(
            "loss {:.4} lr {:.2e} gnorm {:.3} {:.0} tok/s{eval}",
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
