//! Run configs: complete TOML files in `configs/`, loaded with unknown keys refused and
//! validated once at start.

use crate::data::DataConfig;
use crate::diloco::DilocoConfig;
use crate::error::{Error, Result};
use crate::models::{ModelConfig, ModelSpec, Precision};
use crate::optim::AdamWConfig;
use crate::parallel::ParallelConfig;
use crate::sample::SampleConfig;
use crate::schedule::Schedule;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A run config file: `[model]`, `[data]`, `[train]`, `[eval]`, `[checkpoint]`, the optional
/// `[diloco]` table for training across machines, and the optional `[coordinator]` table, which
/// the coordinator reads and validates itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub model: ModelSpec,
    pub data: DataConfig,
    pub train: TrainConfig,
    pub eval: EvalConfig,
    pub checkpoint: CheckpointConfig,
    /// Training across machines (`forge-node join`); a single-node run ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diloco: Option<DilocoConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinator: Option<toml::Table>,
}

/// `[train]`: the optimisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Run directory: checkpoints, metrics.jsonl, the tokenizer, a copy of the config.
    pub out_dir: PathBuf,
    pub seq_len: i64,
    /// Sequences per optimizer step.
    pub batch_size: usize,
    /// Sequences per forward/backward; batch_size / micro_batch steps of gradient accumulation.
    pub micro_batch: usize,
    /// Budget in optimizer steps, or
    pub max_steps: Option<u64>,
    /// in tokens (rounded up to whole steps). Exactly one of the two.
    pub max_tokens: Option<u64>,
    /// Peak learning rate.
    pub lr: f64,
    /// If set, the peak lr is scaled by √(batch tokens / this).
    pub lr_reference_batch_tokens: Option<u64>,
    pub schedule: Schedule,
    pub adamw: AdamWConfig,
    /// Global gradient-norm clip; 0 disables.
    pub grad_clip: f64,
    pub seed: u64,
    /// cpu or cuda:N.
    pub device: String,
    /// fp32 or bf16 (default: bf16 on CUDA, fp32 on CPU).
    pub precision: Option<Precision>,
    /// CPU threads for libtorch (default: libtorch's choice).
    pub threads: Option<i32>,
    /// Plain log line every this many steps when not on a terminal.
    pub log_every: u64,
    /// Stop when the loss exceeds this multiple of its moving average (after 2 × warmup).
    pub divergence_factor: f64,
    /// Data parallelism over this node's devices (several GPUs, or CPU workers).
    #[serde(default)]
    pub parallel: ParallelConfig,
}

/// `[eval]`: validation loss and a sample story.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Evaluate every this many steps (and at the end).
    pub every: u64,
    /// Validation batches (of micro_batch sequences) in the fixed eval set; 0 = all windows.
    pub batches: usize,
    pub prompt: String,
    pub sample: SampleConfig,
}

/// `[checkpoint]`: when to save and what to keep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Save every this many steps (and at the end, and on Ctrl-C).
    pub every: u64,
    /// Committed checkpoints to keep.
    pub keep: usize,
    /// Resume from the newest valid checkpoint in out_dir.
    pub resume: bool,
}

impl RunConfig {
    /// Reads and validates a run config; errors name the file and the offending key.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            why: format!("cannot read it: {e}"),
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let fail = |why: String| Error::Config {
            path: path.to_path_buf(),
            why,
        };
        let cfg: RunConfig =
            toml::from_str(text).map_err(|e| fail(e.to_string().trim_end().to_string()))?;
        cfg.model_config()
            .map_err(|e| fail(format!("[model]: {e}")))?;
        cfg.validate().map_err(|e| fail(e.to_string()))?;
        Ok(cfg)
    }

    pub fn model_config(&self) -> Result<ModelConfig> {
        self.model.resolve()
    }

    /// Optimizer steps this run takes.
    pub fn total_steps(&self) -> u64 {
        let t = &self.train;
        match (t.max_steps, t.max_tokens) {
            (Some(steps), _) => steps,
            (None, Some(tokens)) => tokens.div_ceil(self.tokens_per_step()),
            (None, None) => 0,
        }
    }

    pub fn tokens_per_step(&self) -> u64 {
        self.train.batch_size as u64 * self.train.seq_len as u64
    }

    fn validate(&self) -> Result<()> {
        let t = &self.train;
        let bad = |why: String| Err(Error::InvalidTrainConfig(why));
        if t.seq_len <= 0 {
            return bad(format!("seq_len must be positive, got {}", t.seq_len));
        }
        let max_seq = self.model_config()?.max_seq_len;
        if t.seq_len > max_seq {
            return bad(format!(
                "seq_len {} exceeds the model's max_seq_len {max_seq}; lower seq_len or set [model] max_seq_len",
                t.seq_len
            ));
        }
        let per_device_batches = !t.parallel.micro_batch.is_empty();
        if t.micro_batch == 0
            || t.batch_size == 0
            || (!per_device_batches && t.batch_size % t.micro_batch != 0)
        {
            return bad(format!(
                "batch_size {} must be a positive multiple of micro_batch {}",
                t.batch_size, t.micro_batch
            ));
        }
        match (t.max_steps, t.max_tokens) {
            (Some(_), Some(_)) => return bad("set max_steps or max_tokens, not both".into()),
            (None, None) => return bad("set a budget: max_steps or max_tokens".into()),
            _ => {}
        }
        if self.total_steps() == 0 {
            return bad("the budget is zero steps".into());
        }
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            return bad(format!("lr must be positive, got {}", t.lr));
        }
        if t.divergence_factor <= 1.0 {
            return bad(format!(
                "divergence_factor must exceed 1, got {}",
                t.divergence_factor
            ));
        }
        t.schedule.validate(self.total_steps())?;
        if self.eval.every == 0 || self.checkpoint.every == 0 {
            return bad("[eval] every and [checkpoint] every must be at least 1".into());
        }
        if let Some(diloco) = &self.diloco {
            diloco.validate()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped(name: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../configs")
            .join(name);
        std::fs::read_to_string(path).unwrap()
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_file_and_key() {
        let path = Path::new("configs/x.toml");
        let base = shipped("tiny-cpu.toml");
        let err =
            RunConfig::parse(&base.replace("[model]\n", "[model]\nwidth = 3\n"), path).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("configs/x.toml") && msg.contains("unknown field `width`"),
            "{msg}"
        );
        let err = RunConfig::parse(&base.replace("[model]", "[modle]"), path).unwrap_err();
        assert!(err.to_string().contains("unknown field `modle`"), "{err}");
        let err = RunConfig::parse(
            &base.replace("preset = \"tiny\"", "preset = \"huge\""),
            path,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("[model]: unknown model preset 'huge'"),
            "{err}"
        );
        let err = RunConfig::parse(&base.replace("micro_batch = ", "micro_batch = 7 #"), path)
            .unwrap_err();
        assert!(
            err.to_string().contains("multiple of micro_batch 7"),
            "{err}"
        );
    }

    #[test]
    fn shipped_configs_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                RunConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
                seen += 1;
            }
        }
        assert!(seen >= 3, "configs in {}", dir.display());
    }
}
