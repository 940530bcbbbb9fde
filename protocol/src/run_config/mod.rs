//! The run config schema: the TOML file a run is described by, one type per table, with unknown
//! keys refused and every check that needs no tensors, so `forge-coordinator serve` refuses a
//! bad file at start with the same errors `forge-node train` gives.
//!
//! No I/O: callers read the file and hand [`RunConfig::parse`] its text and its path (named in
//! every error), and hand [`RunConfig::read_init`] a way to read the `config.json` of a
//! `[model] init_from` folder. The coordinator hands the text itself to nodes; the structs here
//! are what both sides read out of it.

mod data;
mod diloco;
mod overrides;
mod parallel;
mod schedule;

pub use data::{CorpusFormat, CurriculumPoint, DataConfig, MixSource, TokenizerConfig};
pub use diloco::{DilocoConfig, OuterLrScaling, OverlapSteps, Pace, Spread};
pub use overrides::{NODE_KEYS, apply_overrides};
pub use parallel::{GradDtype, ParallelConfig, WorkerBatch};
pub use schedule::{Anneal, AnnealPlan, NO_DECAY_PHASE, Schedule};

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::hf::{self, HfModel};
use crate::model::{ModelConfig, ModelSpec, Precision};

/// A run config or model description that cannot be used: which table or key, and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("unknown model preset '{name}'; known presets: {known}")]
    UnknownPreset { name: String, known: String },

    #[error("invalid model config: {0}")]
    InvalidModel(String),

    #[error("invalid [train] settings: {0}")]
    InvalidTrain(String),

    #[error("invalid [data] settings: {0}")]
    InvalidData(String),

    /// Any of the above, or a TOML error, in a config file.
    #[error("config file {path}: {why}")]
    File { path: PathBuf, why: String },
}

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
    /// The `[model] init_from` folder as [`RunConfig::read_init`] read it; not in the file.
    #[serde(skip)]
    pub init: Option<InitFolder>,
}

/// A `[model] init_from` folder, as read for a run.
#[derive(Debug, Clone, PartialEq)]
pub struct InitFolder {
    /// The folder (relative to where the program runs, or a node's `--data-root`).
    pub dir: PathBuf,
    /// What its `config.json` says.
    pub model: HfModel,
    /// The run's tokenizer is the folder's (`[data] tokenizer` was left out).
    pub tokenizer: bool,
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
    /// `[train.optimizer]`: which inner optimizer (AdamW unless set).
    #[serde(default)]
    pub optimizer: OptimizerConfig,
    /// Keep only each block's input in the forward and recompute its activations in backward:
    /// less memory for activations, one more forward per step.
    #[serde(default)]
    pub activation_checkpointing: bool,
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

/// `[train.adamw]`: AdamW hyper-parameters (defaults from the DiLoCo inner optimizer).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

/// `[train.optimizer]`: the inner optimizer. AdamW (`[train.adamw]`) for every parameter, or
/// Muon for the hidden weight matrices with AdamW for the rest, or Adafactor for all.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    #[serde(default)]
    pub kind: OptimizerKind,
    #[serde(default)]
    pub muon: MuonConfig,
    #[serde(default)]
    pub adafactor: AdafactorConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    #[default]
    Adamw,
    Muon,
    Adafactor,
}

/// How Muon scales its learning rate per matrix (PyTorch's `adjust_lr_fn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MuonLrAdjust {
    /// `lr · √max(1, fan_out / fan_in)` (PyTorch's default, Keller Jordan's Muon).
    Original,
    /// `lr · 0.2 · √max(fan_out, fan_in)`: updates of AdamW's RMS, so the AdamW lr serves both
    /// groups (Moonlight's recipe).
    #[default]
    MatchRmsAdamw,
    /// `lr` unchanged.
    None,
}

/// `[train.optimizer.muon]`: PyTorch's `torch.optim.Muon` options. The scheduled lr (`[train]
/// lr` and its schedule) drives both Muon and the AdamW of the other parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MuonConfig {
    pub momentum: f64,
    pub nesterov: bool,
    /// Newton–Schulz iterations.
    pub ns_steps: u32,
    pub adjust_lr_fn: MuonLrAdjust,
    /// Decoupled weight decay of the Muon matrices (`[train.adamw] weight_decay` is the rest's).
    pub weight_decay: f64,
    /// The precision of the Newton–Schulz iteration; see [`NsPrecision`].
    pub ns_precision: NsPrecision,
}

/// `[train.optimizer.muon] ns_precision`: the number format Muon orthogonalises its update in.
///
/// `torch.optim.Muon` runs Newton–Schulz in bf16, which GPUs multiply at full speed. Most CPUs
/// have no bf16 matrix unit and emulate it: on this project's AVX2 machine the iteration of a
/// 128×384 matrix took 20× as long in bf16 as in fp32, and bf16 Newton–Schulz was 78% of a
/// Muon step of the `tiny` model (docs/benchmarks/train-step.md). fp32 is the same iteration
/// with rounding error smaller, not larger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NsPrecision {
    /// bf16 on CUDA devices (PyTorch's choice), fp32 elsewhere.
    #[default]
    Auto,
    /// bf16 everywhere: `torch.optim.Muon`'s arithmetic on every device.
    Bf16,
    /// fp32 everywhere.
    Fp32,
}

impl Default for MuonConfig {
    fn default() -> Self {
        MuonConfig {
            momentum: 0.95,
            nesterov: true,
            ns_steps: 5,
            adjust_lr_fn: MuonLrAdjust::MatchRmsAdamw,
            weight_decay: 0.1,
            ns_precision: NsPrecision::Auto,
        }
    }
}

/// `[train.optimizer.adafactor]`: PyTorch's `torch.optim.Adafactor` options (its relative step
/// size `min(lr, 1/√t)` takes the scheduled lr).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdafactorConfig {
    /// The second moments' decay: 1 − β₂(t) = t^beta2_decay.
    pub beta2_decay: f64,
    /// Floor of the second moment estimate (default: the parameters' dtype epsilon).
    pub eps1: Option<f64>,
    /// Floor of the parameter scale the step is relative to.
    pub eps2: f64,
    /// Clipping threshold of the update's RMS.
    pub d: f64,
    pub weight_decay: f64,
}

impl Default for AdafactorConfig {
    fn default() -> Self {
        AdafactorConfig {
            beta2_decay: -0.8,
            eps1: None,
            eps2: 1e-3,
            d: 1.0,
            weight_decay: 0.0,
        }
    }
}

impl OptimizerConfig {
    /// Values PyTorch refuses are refused here, naming the key (NaN is refused everywhere).
    pub fn validate(&self) -> Result<(), String> {
        let m = &self.muon;
        let a = &self.adafactor;
        let checks = [
            (
                (0.0..1.0).contains(&m.momentum),
                "[train.optimizer.muon] momentum must be in [0, 1)",
            ),
            (
                (1..100).contains(&m.ns_steps),
                "[train.optimizer.muon] ns_steps must be 1 to 99",
            ),
            (
                m.weight_decay >= 0.0,
                "[train.optimizer.muon] weight_decay must be >= 0",
            ),
            (
                a.beta2_decay <= 0.0,
                "[train.optimizer.adafactor] beta2_decay must be <= 0",
            ),
            (
                a.eps1.is_none_or(|e| e >= 0.0),
                "[train.optimizer.adafactor] eps1 must be >= 0",
            ),
            (
                a.eps2 >= 0.0,
                "[train.optimizer.adafactor] eps2 must be >= 0",
            ),
            (a.d >= 1.0, "[train.optimizer.adafactor] d must be >= 1"),
            (
                a.weight_decay >= 0.0,
                "[train.optimizer.adafactor] weight_decay must be >= 0",
            ),
        ];
        match checks.into_iter().find(|(ok, _)| !ok) {
            Some((_, why)) => Err(why.to_string()),
            None => Ok(()),
        }
    }
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

/// `[eval.sample]`: how to sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleConfig {
    /// New tokens to generate.
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 means greedy.
    pub temperature: f64,
    /// Sample only among the k most likely tokens; 0 means the whole vocabulary.
    pub top_k: i64,
    pub seed: i64,
}

impl Default for SampleConfig {
    fn default() -> Self {
        SampleConfig {
            max_new_tokens: 120,
            temperature: 0.8,
            top_k: 40,
            seed: 0,
        }
    }
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
    /// Write the periodic checkpoints of `train` in the background: the step waits only while
    /// the state is copied out (host memory for one more copy of the model and optimizer);
    /// `false` writes them in the step, as the final and Ctrl-C checkpoints always are.
    #[serde(default = "default_true")]
    pub background: bool,
}

fn default_true() -> bool {
    true
}

impl RunConfig {
    /// Parses and validates the text of a run config read from `path`; errors name the file
    /// and the offending key.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let fail = |why: String| ConfigError::File {
            path: path.to_path_buf(),
            why,
        };
        let cfg: RunConfig =
            toml::from_str(text).map_err(|e| fail(e.to_string().trim_end().to_string()))?;
        // A folder's architecture is checked once read_init has read it.
        if cfg.model.init_from.is_none() {
            let model = cfg
                .model_config()
                .map_err(|e| fail(format!("[model]: {e}")))?;
            cfg.check_seq_len(&model).map_err(|e| fail(e.to_string()))?;
        }
        cfg.validate().map_err(|e| fail(e.to_string()))?;
        Ok(cfg)
    }

    /// Reads the `config.json` of `[model] init_from` with `read` (given its path) and checks
    /// the run against it: what `[model]` states and `seq_len`. A left-out `[data] tokenizer`
    /// becomes the folder's `tokenizer.json`. Nothing to do without `init_from`, or once read.
    /// `path` is the run config's, named in errors.
    pub fn read_init(
        &mut self,
        path: &Path,
        read: impl FnOnce(&Path) -> std::io::Result<String>,
    ) -> Result<(), ConfigError> {
        let Some(dir) = self.model.init_from.clone() else {
            return Ok(());
        };
        if self.init.is_some() {
            return Ok(());
        }
        let fail = |why: String| ConfigError::File {
            path: path.to_path_buf(),
            why: format!("[model] init_from {}: {why}", dir.display()),
        };
        let config_path = dir.join(hf::CONFIG);
        let text = read(&config_path).map_err(|e| {
            fail(format!(
                "cannot read {}: {e}; init_from names a Hugging Face model folder \
                 (config.json, model.safetensors or its shards, tokenizer.json)",
                config_path.display()
            ))
        })?;
        let model = HfModel::parse(&text)
            .map_err(|why| fail(format!("{}: {why}", config_path.display())))?;
        let config = self
            .model
            .resolve_with(&model.config, &config_path)
            .map_err(|e| fail(e.to_string()))?;
        self.check_seq_len(&config)
            .map_err(|e| fail(e.to_string()))?;
        let tokenizer = self.data.tokenizer.is_none();
        if tokenizer {
            self.data.tokenizer = Some(TokenizerConfig::Path(dir.join(hf::TOKENIZER)));
        }
        self.init = Some(InitFolder {
            dir,
            model,
            tokenizer,
        });
        Ok(())
    }

    /// The model this run trains: `[model]` resolved, or the `init_from` folder's architecture
    /// once [`RunConfig::read_init`] has read it.
    pub fn model_config(&self) -> Result<ModelConfig, ConfigError> {
        match &self.init {
            Some(init) if self.model.init_from.is_some() => Ok(init.model.config.clone()),
            _ => self.model.resolve(),
        }
    }

    /// The global version a DiLoCo run ends at: one committed round for each round a replica
    /// needs for [`RunConfig::total_steps`]. The coordinator owns this budget; 0 when the run has
    /// no `[diloco]` table or no budget (it then runs until stopped).
    pub fn final_version(&self) -> u64 {
        self.diloco
            .as_ref()
            .map_or(0, |diloco| diloco.rounds_for(self.total_steps()))
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

    fn validate(&self) -> Result<(), ConfigError> {
        let t = &self.train;
        let bad = |why: String| Err(ConfigError::InvalidTrain(why));
        if t.seq_len <= 0 {
            return bad(format!("seq_len must be positive, got {}", t.seq_len));
        }
        let per_device_batches = !t.parallel.micro_batch.is_empty();
        if t.micro_batch == 0
            || t.batch_size == 0
            || (!per_device_batches && !t.batch_size.is_multiple_of(t.micro_batch))
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
        t.optimizer.validate().map_err(ConfigError::InvalidTrain)?;
        if self.eval.every == 0 || self.checkpoint.every == 0 {
            return bad("[eval] every and [checkpoint] every must be at least 1".into());
        }
        if let Some(diloco) = &self.diloco {
            diloco.validate()?;
        }
        t.parallel.validate()?;
        if self.model.init_from.is_none() {
            if self.model.init_sha256.is_some() {
                return Err(ConfigError::InvalidModel(
                    "[model] init_sha256 pins the files of init_from, which is not set".into(),
                ));
            }
            if self.data.tokenizer.is_none() {
                return Err(ConfigError::InvalidData(
                    "tokenizer is missing: give tokenizer = { path = \"tokenizer.json\" } or \
                     { train = { vocab_size = 2048 } } (it may be left out only with [model] \
                     init_from, whose folder's tokenizer.json is then the run's)"
                        .into(),
                ));
            }
        }
        if let Some((name, digest)) = self.model.init_sha256.iter().flatten().find(|(_, d)| {
            d.len() != 64
                || !d
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        }) {
            return Err(ConfigError::InvalidModel(format!(
                "[model] init_sha256 gives {name} the digest \"{digest}\"; a SHA-256 is 64 \
                 lowercase hex digits"
            )));
        }
        self.data.validate()
    }

    /// `seq_len` fits the model's positions.
    fn check_seq_len(&self, model: &ModelConfig) -> Result<(), ConfigError> {
        let seq_len = self.train.seq_len;
        if seq_len > model.max_seq_len {
            let fix = if self.model.init_from.is_some() {
                "lower seq_len (the folder's config.json sets max_position_embeddings / n_positions)"
            } else {
                "lower seq_len or set [model] max_seq_len"
            };
            return Err(ConfigError::InvalidTrain(format!(
                "seq_len {seq_len} exceeds the model's max_seq_len {}; {fix}",
                model.max_seq_len
            )));
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

    fn parse_err(text: &str) -> String {
        RunConfig::parse(text, Path::new("configs/x.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_file_and_key() {
        let base = shipped("tiny-cpu.toml");
        let msg = parse_err(&base.replace("[model]\n", "[model]\nwidth = 3\n"));
        assert!(
            msg.contains("configs/x.toml") && msg.contains("unknown field `width`"),
            "{msg}"
        );
        let err = parse_err(&base.replace("[model]", "[modle]"));
        assert!(err.contains("unknown field `modle`"), "{err}");
        let err = parse_err(&base.replace("preset = \"tiny\"", "preset = \"huge\""));
        assert!(
            err.contains("[model]: unknown model preset 'huge'"),
            "{err}"
        );
        let err = parse_err(&base.replace("micro_batch = ", "micro_batch = 7 #"));
        assert!(err.contains("multiple of micro_batch 7"), "{err}");
    }

    #[test]
    fn a_typo_in_train_data_or_diloco_is_refused_with_the_key_named() {
        let base = shipped("diloco-tiny-cpu.toml");
        RunConfig::parse(&base, Path::new("configs/x.toml")).unwrap();
        for (table, typo) in [
            ("[train]\n", "lr_typo = 1"),
            ("[train.schedule]\n", "warmup = 1"),
            ("[train.adamw]\n", "beta_1 = 0.9"),
            ("[data]\n", "shuffle = true"),
            ("[diloco]\n", "outer_lrate = 0.7"),
            ("[eval.sample]\n", "topk = 3"),
            ("[checkpoint]\n", "keep_last = 3"),
        ] {
            assert!(base.contains(table), "{table}");
            let key = typo.split(' ').next().unwrap();
            let err = parse_err(&base.replacen(table, &format!("{table}{typo}\n"), 1));
            assert!(
                err.contains("configs/x.toml") && err.contains(&format!("unknown field `{key}`")),
                "{table}: {err}"
            );
        }
    }

    #[test]
    fn invalid_values_of_every_table_are_refused() {
        let base = shipped("diloco-tiny-cpu.toml");
        for (from, to, why) in [
            (
                "inner_steps = 5\n",
                "inner_steps = 0\n",
                "[diloco] inner_steps",
            ),
            ("lr = ", "lr = -1 #", "lr must be positive"),
            (
                "warmup_steps = 60",
                "warmup_steps = 3000",
                "warmup_steps 3000",
            ),
            (
                "[train.schedule]",
                "[train.parallel]\nbucket_mb = 0\n\n[train.schedule]",
                "[train.parallel] bucket_mb",
            ),
            (
                "val = \"../shared/data/tinystories/valid-sample.txt\"",
                "val = \"../shared/data/tinystories/train-sample.txt\"",
                "both a train and a val file",
            ),
        ] {
            assert!(base.contains(from), "{from}");
            let err = parse_err(&base.replacen(from, to, 1));
            assert!(
                err.contains("configs/x.toml") && err.contains(why),
                "{from}: {err}"
            );
        }
    }

    #[test]
    fn shipped_configs_parse_and_round_trip() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let text = std::fs::read_to_string(&path).unwrap();
                let cfg = RunConfig::parse(&text, &path).unwrap_or_else(|e| panic!("{e}"));
                // A checkpoint stores the config as TOML and reads it back.
                let again = toml::to_string(&cfg).unwrap();
                assert_eq!(RunConfig::parse(&again, &path).unwrap(), cfg);
                seen += 1;
            }
        }
        assert!(seen >= 3, "configs in {}", dir.display());
    }

    /// A tiny Llama folder's config.json, as transformers 5 writes it.
    const FOLDER_CONFIG: &str = r#"{"model_type": "llama", "hidden_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 96, "vocab_size": 300, "max_position_embeddings": 128,
        "rms_norm_eps": 1e-06, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": false}"#;

    /// tiny-cpu.toml starting from folder `hf/llama` instead of the tiny preset, `[model]`
    /// extended by `model` and the tokenizer line replaced by `tokenizer`.
    fn from_folder(model: &str, tokenizer: &str) -> String {
        let base = shipped("tiny-cpu.toml");
        let line = base
            .lines()
            .find(|l| l.starts_with("tokenizer = "))
            .unwrap()
            .to_string();
        base.replace(
            "preset = \"tiny\"",
            &format!("init_from = \"hf/llama\"\n{model}"),
        )
        .replace(&line, tokenizer)
    }

    fn read_folder(text: &str) -> Result<RunConfig, ConfigError> {
        let mut cfg = RunConfig::parse(text, Path::new("configs/x.toml"))?;
        cfg.read_init(Path::new("configs/x.toml"), |path| {
            assert_eq!(path, Path::new("hf/llama/config.json"));
            Ok(FOLDER_CONFIG.to_string())
        })?;
        Ok(cfg)
    }

    #[test]
    fn init_from_brings_the_architecture_and_the_tokenizer() {
        let cfg = read_folder(&from_folder("", "")).unwrap();
        let model = cfg.model_config().unwrap();
        assert_eq!(
            (model.n_layer, model.d_model, model.vocab_size),
            (2, 64, 300)
        );
        assert_eq!(
            cfg.data.tokenizer,
            Some(TokenizerConfig::Path("hf/llama/tokenizer.json".into()))
        );
        let init = cfg.init.as_ref().unwrap();
        assert!(init.tokenizer);
        assert_eq!(init.model.eos_token_ids, [2]);
        // Reading again changes nothing; the stored config parses back, its tokenizer now
        // named, and no longer the folder's when read.
        let mut again = cfg.clone();
        again.read_init(Path::new("x"), |_| unreachable!()).unwrap();
        assert_eq!(again, cfg);
        let stored = read_folder(&toml::to_string(&cfg).unwrap()).unwrap();
        assert!(!stored.init.unwrap().tokenizer);

        // A tokenizer of its own stays; the config without init_from must name one.
        let own = read_folder(&from_folder("", "tokenizer = { path = \"t.json\" }")).unwrap();
        assert_eq!(
            own.data.tokenizer,
            Some(TokenizerConfig::Path("t.json".into()))
        );
        assert!(!own.init.unwrap().tokenizer);
        let base = shipped("tiny-cpu.toml");
        let line = base
            .lines()
            .find(|l| l.starts_with("tokenizer = "))
            .unwrap();
        let err = parse_err(&base.replace(line, ""));
        assert!(err.contains("tokenizer is missing"), "{err}");

        // Before the folder is read, the model is unknown, and says why.
        let unread = RunConfig::parse(&from_folder("", ""), Path::new("x.toml")).unwrap();
        let err = unread.model_config().unwrap_err().to_string();
        assert!(err.contains("hf/llama/config.json"), "{err}");
    }

    #[test]
    fn init_from_mismatches_and_bad_folders_are_named() {
        let err = |model: &str| {
            read_folder(&from_folder(model, ""))
                .unwrap_err()
                .to_string()
        };
        let e = err("n_layer = 4");
        assert!(
            e.contains("configs/x.toml")
                && e.contains("[model] init_from hf/llama")
                && e.contains(
                    "[model] n_layer = 4 but hf/llama/config.json says num_hidden_layers = 2"
                ),
            "{e}"
        );
        let e = err("preset = \"tiny\"");
        assert!(e.contains("preset \"tiny\" has vocab_size = 2048"), "{e}");
        // seq_len 128 fits the folder's 128 positions; 256 does not.
        let text = from_folder("", "").replace("seq_len = 128", "seq_len = 256");
        let e = read_folder(&text).unwrap_err().to_string();
        assert!(
            e.contains("seq_len 256 exceeds the model's max_seq_len 128"),
            "{e}"
        );

        let mut cfg = RunConfig::parse(&from_folder("", ""), Path::new("x.toml")).unwrap();
        let e = cfg
            .read_init(Path::new("x.toml"), |_| {
                Err(std::io::Error::from(std::io::ErrorKind::NotFound))
            })
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cannot read hf/llama/config.json")
                && e.contains("Hugging Face model folder"),
            "{e}"
        );
        let e = cfg
            .read_init(Path::new("x.toml"), |_| {
                Ok(r#"{"model_type": "bert"}"#.into())
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains("model_type = \"bert\""), "{e}");

        let pinned = |digest: &str| {
            from_folder(
                &format!("init_sha256 = {{ \"config.json\" = \"{digest}\" }}"),
                "",
            )
        };
        read_folder(&pinned(&"a1".repeat(32))).unwrap();
        let e = parse_err(&pinned("abc"));
        assert!(
            e.contains("init_sha256 gives config.json the digest \"abc\""),
            "{e}"
        );
        let base = shipped("tiny-cpu.toml");
        let e = parse_err(&base.replace(
            "preset = \"tiny\"",
            "preset = \"tiny\"\ninit_sha256 = { \"config.json\" = \"00\" }",
        ));
        assert!(e.contains("init_from, which is not set"), "{e}");
    }

    #[test]
    fn budget_in_tokens_rounds_up_to_whole_steps() {
        let base = shipped("tiny-cpu.toml");
        let cfg = RunConfig::parse(
            &base.replace("max_steps = 500", "max_tokens = 81921"),
            Path::new("x.toml"),
        )
        .unwrap();
        // 16 sequences of 128 tokens per step.
        assert_eq!((cfg.tokens_per_step(), cfg.total_steps()), (2048, 41));
        let err = parse_err(&base.replace("max_steps = 500", "max_steps = 500\nmax_tokens = 9"));
        assert!(err.contains("not both"), "{err}");
    }
}
