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
    /// With a `[data] mix`: the training tokens this run read of each source so far, by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_tokens: Option<std::collections::BTreeMap<String, u64>>,
}

/// A run's wall clock by what it was spent on (seconds). `step_s`, `eval_s`, `checkpoint_s`,
/// `outer_sync_s`, `waiting_s`, `state_fetch_s` and `other_s` add up to the wall clock; the
/// step's parts (data, forward and backward, exchange, optimizer) are within `step_s`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Phases {
    /// Training steps: data, forward, backward, gradient exchange and optimizer.
    pub step_s: f64,
    /// Of `step_s`: taking micro-batches from the data stream onto the device.
    #[serde(default)]
    pub data_s: f64,
    /// Of `step_s`: forward and backward passes (a pipeline stage's micro-batch schedule, with
    /// its transfers and waits for the other stages).
    #[serde(default)]
    pub forward_backward_s: f64,
    /// Of `step_s`: the gradient exchange among the node's data-parallel workers.
    #[serde(default)]
    pub exchange_s: f64,
    /// Of `step_s`: clipping and the optimizer step.
    #[serde(default)]
    pub optimizer_s: f64,
    pub eval_s: f64,
    /// Saving checkpoints: the copy, or the whole write when it is done in the step, and any
    /// wait for a background write.
    pub checkpoint_s: f64,
    /// DiLoCo: the outer all-reduce and the outer step.
    #[serde(default)]
    pub outer_sync_s: f64,
    /// DiLoCo: waiting for the coordinator (a round to open, the others to finish theirs).
    #[serde(default)]
    pub waiting_s: f64,
    /// DiLoCo: fetching the global state from peers (joiners, and nodes that missed a commit).
    #[serde(default)]
    pub state_fetch_s: f64,
    /// Everything else: metrics, logging, the divergence guard.
    pub other_s: f64,
}

impl Phases {
    /// The wall clock they account for.
    pub fn total(&self) -> f64 {
        self.step_s
            + self.eval_s
            + self.checkpoint_s
            + self.outer_sync_s
            + self.waiting_s
            + self.state_fetch_s
            + self.other_s
    }

    /// Counts what the other phases leave of `wall` seconds as `other_s`.
    pub fn rest_of(&mut self, wall: f64) {
        self.other_s = 0.0;
        self.other_s = wall - self.total();
    }

    /// Sets the step's parts from a trainer's step timing over the same span.
    pub fn set_step_parts(&mut self, timing: &crate::train::StepTiming) {
        self.data_s = timing.data_s;
        self.forward_backward_s = timing.forward_backward_s;
        self.exchange_s = timing.comm_s;
        self.optimizer_s = timing.optimizer_s;
    }

    /// The time spent since `earlier` (these phases at that time).
    pub fn since(&self, earlier: &Phases) -> Phases {
        Phases {
            step_s: self.step_s - earlier.step_s,
            data_s: self.data_s - earlier.data_s,
            forward_backward_s: self.forward_backward_s - earlier.forward_backward_s,
            exchange_s: self.exchange_s - earlier.exchange_s,
            optimizer_s: self.optimizer_s - earlier.optimizer_s,
            eval_s: self.eval_s - earlier.eval_s,
            checkpoint_s: self.checkpoint_s - earlier.checkpoint_s,
            outer_sync_s: self.outer_sync_s - earlier.outer_sync_s,
            waiting_s: self.waiting_s - earlier.waiting_s,
            state_fetch_s: self.state_fetch_s - earlier.state_fetch_s,
            other_s: self.other_s - earlier.other_s,
        }
    }

    /// "forward+backward 70.1%, optimizer 8.0%, data 0.3%, eval 21.3%, other 0.3%": each
    /// part's share of the wall clock, the step by its parts (the rest of the step, when it
    /// is over 0.05%, as "step, other"); parts under 0.05% are left out.
    pub fn shares(&self) -> String {
        let total = self.total().max(1e-9);
        let parts = self.data_s + self.forward_backward_s + self.exchange_s + self.optimizer_s;
        let named = [
            ("forward+backward", self.forward_backward_s),
            ("optimizer", self.optimizer_s),
            ("data", self.data_s),
            ("gradient exchange", self.exchange_s),
            ("step, other", self.step_s - parts),
            ("eval", self.eval_s),
            ("checkpoint", self.checkpoint_s),
            ("outer sync", self.outer_sync_s),
            ("waiting for the round", self.waiting_s),
            ("state fetch", self.state_fetch_s),
            ("other", self.other_s),
        ];
        let shown: Vec<String> = named
            .iter()
            .map(|(name, s)| (name, 100.0 * s / total))
            .filter(|(_, share)| *share >= 0.05)
            .map(|(name, share)| format!("{name} {share:.1}%"))
            .collect();
        if shown.is_empty() {
            "nothing measured".to_string()
        } else {
            shown.join(", ")
        }
    }
}

/// Appends metrics to a JSONL file and shows progress.
#[derive(Debug)]
pub struct MetricsLog {
    file: File,
    bar: Option<ProgressBar>,
    log_every: u64,
    /// Tokens, elapsed seconds and phases at the last progress line, whose wall-clock tokens/s
    /// and breakdown the next line reports over the steps between them.
    shown: Option<(u64, f64, Phases)>,
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
        let (wall, phases) = match self.shown {
            Some((tokens, elapsed, phases)) if m.elapsed_s > elapsed => (
                (m.tokens - tokens) as f64 / (m.elapsed_s - elapsed),
                m.phases.since(&phases),
            ),
            _ => (m.wall_tokens_per_s, m.phases),
        };
        if shows {
            self.shown = Some((m.tokens, m.elapsed_s, m.phases));
        }
        let summary = format!(
            "loss {:.4} lr {:.2e} gnorm {:.3} {:.0} tok/s, {wall:.0} tok/s of wall clock ({}){eval}",
            m.loss,
            m.lr,
            m.grad_norm,
            m.tokens_per_s,
            phases.shares()
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

    /// The run's end moved (`forge-node control anneal`): the progress bar follows.
    pub fn set_total(&self, total_steps: u64) {
        if let Some(bar) = &self.bar {
            bar.set_length(total_steps);
        }
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
