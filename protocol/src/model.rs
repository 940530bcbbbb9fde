//! The model vocabulary the trainer and the coordinator share: architecture families, the named
//! presets, the complete [`ModelConfig`] a `[model]` table resolves to, and the analytic numbers
//! computed from it (parameters, matmul parameters, training FLOPs per token, training memory
//! per parameter) that `forge-node model info` prints and the stage planner plans with.
//!
//! Descriptions only, no tensors: the trainer builds models from them, the coordinator sizes
//! pipeline stages with them, and neither keeps a copy of the presets.

pub mod hf;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::run_config::ConfigError;

/// Bytes per parameter for the weights and their gradients, both fp32 (mixed precision keeps
/// fp32 master weights; bf16 is only the compute dtype).
pub const WEIGHT_AND_GRAD_BYTES: u64 = 8;
/// Bytes per parameter for AdamW's two fp32 moments.
pub const ADAMW_BYTES: u64 = 8;
/// Bytes per parameter for the DiLoCo outer state: the fp32 global parameters and the outer
/// Nesterov momentum.
pub const OUTER_STATE_BYTES: u64 = 8;
/// Bytes per saved activation value (bf16).
pub const ACTIVATION_BYTES: u64 = 2;
/// Bytes per logit (fp32, for the loss).
pub const LOGIT_BYTES: u64 = 4;

/// RMSNorm / LayerNorm epsilon of every preset.
pub const DEFAULT_NORM_EPS: f64 = 1e-5;
/// RoPE base of the presets that do not name one.
pub const DEFAULT_ROPE_THETA: f64 = 10_000.0;

/// Architecture family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// LayerNorm, GELU MLP, learned positions, tied embeddings (HF `GPT2LMHeadModel` keys).
    Gpt2,
    /// RMSNorm, SwiGLU, RoPE, optional grouped-query attention (HF `LlamaForCausalLM` keys).
    Llama,
}

impl std::str::FromStr for Family {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "gpt2" => Ok(Family::Gpt2),
            "llama" => Ok(Family::Llama),
            other => Err(ConfigError::InvalidModel(format!(
                "unknown family '{other}'; use gpt2 or llama"
            ))),
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::Gpt2 => "gpt2",
            Family::Llama => "llama",
        })
    }
}

/// A complete model description. Every field is explicit so a saved config rebuilds the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: i64,
    pub n_layer: i64,
    pub n_head: i64,
    /// Key/value heads; fewer than `n_head` is grouped-query attention (llama only).
    pub n_kv_head: i64,
    pub d_model: i64,
    /// Hidden width of the MLP (GELU for gpt2, SwiGLU for llama).
    pub d_ff: i64,
    /// Longest sequence; the size of gpt2's learned position table.
    pub max_seq_len: i64,
    pub norm_eps: f64,
    /// RoPE base (llama only).
    pub rope_theta: f64,
    /// Output head shares the token embedding (always true for gpt2).
    pub tie_embeddings: bool,
}

/// A named architecture: what `preset = "..."` in `[model]`, `forge-node model info --preset`
/// and `forge-coordinator plan --model` accept.
#[derive(Debug, Clone, PartialEq)]
pub struct Preset {
    pub name: &'static str,
    /// The architecture; its family is the one a config gets when it names none.
    pub config: ModelConfig,
    /// Sequences per micro-batch the stage planner assumes when a plan names none.
    pub plan_micro_batch: u64,
}

/// Multi-head attention, tied head, the common norm epsilon and RoPE base.
const fn preset(
    family: Family,
    vocab_size: i64,
    n_layer: i64,
    n_head: i64,
    d_model: i64,
    d_ff: i64,
    max_seq_len: i64,
) -> ModelConfig {
    ModelConfig {
        family,
        vocab_size,
        n_layer,
        n_head,
        n_kv_head: n_head,
        d_model,
        d_ff,
        max_seq_len,
        norm_eps: DEFAULT_NORM_EPS,
        rope_theta: DEFAULT_ROPE_THETA,
        tie_embeddings: true,
    }
}

/// Every preset, in size order: the one list both crates read.
const TABLE: &[Preset] = &[
    // ~1M parameters: CPU tests.
    Preset {
        name: "tiny",
        config: preset(Family::Llama, 2048, 4, 4, 128, 384, 256),
        plan_micro_batch: 8,
    },
    // 4 layers, d=256, 4 heads, ffn 1024, vocab 2048.
    Preset {
        name: "4m",
        config: preset(Family::Llama, 2048, 4, 4, 256, 1024, 512),
        plan_micro_batch: 8,
    },
    // llama2.c's 15M TinyStories model: 6 layers, d=288, 6 heads, ffn 768, 32k vocab.
    Preset {
        name: "15m",
        config: preset(Family::Llama, 32_000, 6, 6, 288, 768, 256),
        plan_micro_batch: 16,
    },
    // GPT-2 small.
    Preset {
        name: "gpt2-124m",
        config: preset(Family::Gpt2, 50_257, 12, 12, 768, 3072, 1024),
        plan_micro_batch: 8,
    },
    // Llama 3.2 1B: 16 layers, d=2048, 32 heads with 8 kv heads, ffn 8192, 128k vocab, tied
    // head, Llama 3's RoPE base; trained here at 2048 tokens.
    Preset {
        name: "llama-1b",
        config: ModelConfig {
            n_kv_head: 8,
            rope_theta: 500_000.0,
            ..preset(Family::Llama, 128_256, 16, 32, 2048, 8192, 2048)
        },
        plan_micro_batch: 1,
    },
];

/// Preset names, in size order (derived from the table, so the two cannot drift apart).
pub const PRESETS: &[&str] = &{
    let mut names = [""; TABLE.len()];
    let mut i = 0;
    while i < TABLE.len() {
        names[i] = TABLE[i].name;
        i += 1;
    }
    names
};

impl Preset {
    /// Every preset, in size order.
    pub fn all() -> &'static [Preset] {
        TABLE
    }

    /// The preset called `name`; the error lists the known ones.
    pub fn named(name: &str) -> Result<&'static Preset, ConfigError> {
        TABLE
            .iter()
            .find(|preset| preset.name == name)
            .ok_or_else(|| ConfigError::UnknownPreset {
                name: name.to_string(),
                known: PRESETS.join(", "),
            })
    }
}

impl ModelConfig {
    /// A named preset. `family` defaults to the preset's: llama, except for `gpt2-124m`.
    pub fn preset(name: &str, family: Option<Family>) -> Result<Self, ConfigError> {
        let mut cfg = Preset::named(name)?.config.clone();
        if let Some(family) = family {
            cfg.family = family;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the invariants every forward pass relies on; explains what is wrong.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |why: String| Err(ConfigError::InvalidModel(why));
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_kv_head", self.n_kv_head),
            ("d_model", self.d_model),
            ("d_ff", self.d_ff),
            ("max_seq_len", self.max_seq_len),
        ] {
            if value <= 0 {
                return bad(format!("{name} must be positive, got {value}"));
            }
        }
        if self.d_model % self.n_head != 0 {
            return bad(format!(
                "d_model {} is not divisible by n_head {}",
                self.d_model, self.n_head
            ));
        }
        if self.n_head % self.n_kv_head != 0 {
            return bad(format!(
                "n_head {} is not a multiple of n_kv_head {}",
                self.n_head, self.n_kv_head
            ));
        }
        if !(self.norm_eps > 0.0 && self.norm_eps < 1.0) {
            return bad(format!("norm_eps must be in (0, 1), got {}", self.norm_eps));
        }
        match self.family {
            Family::Gpt2 => {
                if self.n_kv_head != self.n_head {
                    return bad(format!(
                        "gpt2 has no grouped-query attention: n_kv_head {} must equal n_head {}",
                        self.n_kv_head, self.n_head
                    ));
                }
                if !self.tie_embeddings {
                    return bad(
                        "gpt2 always ties the output head to wte; set tie_embeddings = true".into(),
                    );
                }
            }
            Family::Llama => {
                if self.head_dim() % 2 != 0 {
                    return bad(format!(
                        "RoPE needs an even head dimension, got d_model/n_head = {}",
                        self.head_dim()
                    ));
                }
                if self.rope_theta <= 1.0 {
                    return bad(format!("rope_theta must be > 1, got {}", self.rope_theta));
                }
            }
        }
        Ok(())
    }

    pub fn head_dim(&self) -> i64 {
        self.d_model / self.n_head
    }

    /// Parameters per transformer block.
    pub fn block_params(&self) -> i64 {
        let d = self.d_model;
        let kv = self.n_kv_head * self.head_dim();
        match self.family {
            // ln_1, ln_2 (weight + bias); c_attn, c_proj; c_fc, c_proj (with biases).
            Family::Gpt2 => {
                4 * d
                    + (d * 3 * d + 3 * d)
                    + (d * d + d)
                    + (d * self.d_ff + self.d_ff)
                    + (self.d_ff * d + d)
            }
            // two RMSNorm weights; q, k, v, o; gate, up, down (no biases).
            Family::Llama => 2 * d + d * d + 2 * d * kv + d * d + 3 * d * self.d_ff,
        }
    }

    /// Parameters per transformer block that take part in matrix multiplies (the weights of
    /// attention and MLP; norms and biases are the rest of [`ModelConfig::block_params`]).
    pub fn block_matmul_params(&self) -> i64 {
        let d = self.d_model;
        let kv = self.n_kv_head * self.head_dim();
        match self.family {
            Family::Gpt2 => 4 * d * d + 2 * d * self.d_ff,
            Family::Llama => 2 * d * d + 2 * d * kv + 3 * d * self.d_ff,
        }
    }

    /// The token embedding table.
    pub fn embedding_params(&self) -> i64 {
        self.vocab_size * self.d_model
    }

    /// gpt2's learned position table (llama has none: RoPE).
    pub fn position_params(&self) -> i64 {
        match self.family {
            Family::Gpt2 => self.max_seq_len * self.d_model,
            Family::Llama => 0,
        }
    }

    /// The norm before the head (LayerNorm weight + bias for gpt2, RMSNorm weight for llama).
    pub fn final_norm_params(&self) -> i64 {
        match self.family {
            Family::Gpt2 => 2 * self.d_model,
            Family::Llama => self.d_model,
        }
    }

    /// The output head's own weights: none when it is tied to the embedding.
    pub fn head_params(&self) -> i64 {
        if self.tie_embeddings {
            0
        } else {
            self.vocab_size * self.d_model
        }
    }

    /// Total trainable parameters (a tied head counts once).
    pub fn param_count(&self) -> i64 {
        self.embedding_params()
            + self.position_params()
            + self.n_layer * self.block_params()
            + self.final_norm_params()
            + self.head_params()
    }

    /// Parameters that take part in matrix multiplies: every block weight plus the output head.
    /// Embedding lookups cost no FLOPs; the (tied) head does.
    pub fn matmul_params(&self) -> i64 {
        self.n_layer * self.block_matmul_params() + self.vocab_size * self.d_model
    }

    /// Training FLOPs per token (forward + backward) at sequence length `seq_len`:
    /// 6 per matmul parameter plus 12·L·T·d for attention scores and values (PaLM appendix B).
    pub fn train_flops_per_token(&self, seq_len: i64) -> f64 {
        6.0 * self.matmul_params() as f64 + 12.0 * (self.n_layer * seq_len * self.d_model) as f64
    }

    /// Bytes of training state per parameter: fp32 weights and gradients plus AdamW's moments.
    pub fn training_state_bytes(&self) -> u64 {
        self.param_count() as u64 * (WEIGHT_AND_GRAD_BYTES + ADAMW_BYTES)
    }
}

/// How a run config names a model: a preset, optionally with fields overridden, or a Hugging
/// Face folder to start from, whose `config.json` brings the architecture.
///
/// ```toml
/// [model]
/// preset = "tiny"      # tiny | 4m | 15m | gpt2-124m | llama-1b
/// family = "llama"     # gpt2 | llama (default: llama, gpt2 for gpt2-124m)
/// vocab_size = 4096    # any ModelConfig field may be overridden
/// # or, instead of a preset:
/// init_from = "hf/my-llama"   # config.json, model.safetensors (or sharded), tokenizer.json
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// A named architecture; optional with `init_from`, which brings its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    /// A Hugging Face model folder (GPT-2 or Llama family, as transformers' `save_pretrained`
    /// writes it) whose weights are the run's initial parameters. A preset or field given
    /// beside it must agree with its `config.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<PathBuf>,
    /// SHA-256 (hex) of every file the run reads from `init_from`, by name: a folder whose files
    /// differ is refused. `forge-coordinator serve` fills it in from its own copy for the nodes;
    /// a config may set it to pin a download.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_sha256: Option<BTreeMap<String, String>>,
    pub family: Option<Family>,
    pub vocab_size: Option<i64>,
    pub n_layer: Option<i64>,
    pub n_head: Option<i64>,
    pub n_kv_head: Option<i64>,
    pub d_model: Option<i64>,
    pub d_ff: Option<i64>,
    pub max_seq_len: Option<i64>,
    pub norm_eps: Option<f64>,
    pub rope_theta: Option<f64>,
    pub tie_embeddings: Option<bool>,
}

impl ModelSpec {
    /// The preset with the overrides applied, validated.
    pub fn resolve(&self) -> Result<ModelConfig, ConfigError> {
        let Some(preset) = &self.preset else {
            return Err(ConfigError::InvalidModel(match &self.init_from {
                Some(dir) => format!(
                    "the architecture is {}'s; read it first (RunConfig::read_init)",
                    dir.join(hf::CONFIG).display()
                ),
                None => format!(
                    "name a preset ({}) or a Hugging Face folder to start from (init_from = \"DIR\")",
                    PRESETS.join(", ")
                ),
            }));
        };
        let mut cfg = ModelConfig::preset(preset, self.family)?;
        let n_head_overridden = self.n_head.is_some();
        macro_rules! apply {
            ($($field:ident),*) => {$(if let Some(v) = self.$field { cfg.$field = v; })*};
        }
        apply!(
            vocab_size,
            n_layer,
            n_head,
            d_model,
            d_ff,
            max_seq_len,
            norm_eps,
            rope_theta,
            tie_embeddings
        );
        // Changing the head count without naming kv heads keeps plain multi-head attention.
        cfg.n_kv_head = self.n_kv_head.unwrap_or(if n_head_overridden {
            cfg.n_head
        } else {
            cfg.n_kv_head
        });
        cfg.validate()?;
        Ok(cfg)
    }

    /// The architecture of the `init_from` folder (`folder`, read from `config_path`), checked
    /// against what this table states: a preset (every field of it) or a field that disagrees
    /// is an error naming the field on both sides.
    pub fn resolve_with(
        &self,
        folder: &ModelConfig,
        config_path: &Path,
    ) -> Result<ModelConfig, ConfigError> {
        let preset = self.preset.as_ref().map(|_| self.resolve()).transpose()?;
        let given = self.given();
        for (field, theirs) in fields(folder) {
            let ours = given
                .iter()
                .find(|(name, _)| *name == field)
                .map(|(_, value)| (format!("[model] {field} = {value}"), value.clone()))
                .or_else(|| {
                    let preset_cfg = preset.as_ref()?;
                    let (_, value) = fields(preset_cfg).into_iter().find(|(n, _)| *n == field)?;
                    let name = self.preset.as_deref().unwrap_or_default();
                    Some((
                        format!("[model] preset \"{name}\" has {field} = {value}"),
                        value,
                    ))
                });
            if let Some((stated, value)) = ours
                && value != theirs
            {
                let hf_field = hf::field_name(folder.family, field);
                return Err(ConfigError::InvalidModel(format!(
                    "{stated} but {} says {hf_field} = {theirs}; leave it out of [model] \
                     (init_from brings the architecture) or start from another folder",
                    config_path.display()
                )));
            }
        }
        Ok(folder.clone())
    }

    /// The fields this table sets itself, with their values as [`fields`] prints them.
    fn given(&self) -> Vec<(&'static str, String)> {
        let mut given = Vec::new();
        macro_rules! push {
            ($($field:ident),*) => {$(if let Some(v) = &self.$field {
                given.push((stringify!($field), v.to_string()));
            })*};
        }
        push!(
            family,
            vocab_size,
            n_layer,
            n_head,
            n_kv_head,
            d_model,
            d_ff,
            max_seq_len,
            norm_eps,
            rope_theta,
            tie_embeddings
        );
        given
    }
}

/// Every field of `cfg` by name, its value printed (floats in their shortest exact form, so
/// equal text is an equal value).
fn fields(cfg: &ModelConfig) -> [(&'static str, String); 11] {
    [
        ("family", cfg.family.to_string()),
        ("vocab_size", cfg.vocab_size.to_string()),
        ("n_layer", cfg.n_layer.to_string()),
        ("n_head", cfg.n_head.to_string()),
        ("n_kv_head", cfg.n_kv_head.to_string()),
        ("d_model", cfg.d_model.to_string()),
        ("d_ff", cfg.d_ff.to_string()),
        ("max_seq_len", cfg.max_seq_len.to_string()),
        ("norm_eps", cfg.norm_eps.to_string()),
        ("rope_theta", cfg.rope_theta.to_string()),
        ("tie_embeddings", cfg.tie_embeddings.to_string()),
    ]
}

/// The dtype matrix multiplies and attention run in. With `fp32` and `bf16` the parameters,
/// norms, softmax and the loss stay fp32 (what autocast does, made explicit because tch's
/// autocast only knows fp16); `bf16-pure` keeps the parameters, their gradients and the
/// optimizer state in bf16 too, and rounds each update stochastically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    Bf16,
    #[serde(rename = "bf16-pure")]
    Bf16Pure,
}

impl Precision {
    /// Whether matrix multiplies run in bf16.
    pub fn bf16_compute(self) -> bool {
        matches!(self, Precision::Bf16 | Precision::Bf16Pure)
    }
}

impl std::str::FromStr for Precision {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "fp32" => Ok(Precision::Fp32),
            "bf16" => Ok(Precision::Bf16),
            "bf16-pure" => Ok(Precision::Bf16Pure),
            other => Err(ConfigError::InvalidModel(format!(
                "unknown precision '{other}'; use fp32, bf16 or bf16-pure"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preset_counts_are_unchanged() {
        // (preset, family, parameters, matmul parameters): the counts of the trainer's and the
        // planner's former preset tables, pinned so a table edit cannot shift them silently.
        let expected = [
            ("tiny", Family::Llama, 1_115_264, 1_114_112),
            ("tiny", Family::Gpt2, 956_672, 917_504),
            ("4m", Family::Llama, 4_720_896, 4_718_592),
            ("4m", Family::Gpt2, 3_814_912, 3_670_016),
            ("15m", Family::Llama, 15_191_712, 15_187_968),
            ("15m", Family::Gpt2, 13_955_328, 13_860_864),
            ("gpt2-124m", Family::Gpt2, 124_439_808, 123_532_032),
            ("llama-1b", Family::Llama, 1_235_814_400, 1_235_746_816),
        ];
        for (name, family, params, matmul) in expected {
            let cfg = ModelConfig::preset(name, Some(family)).unwrap();
            assert_eq!(
                (cfg.param_count(), cfg.matmul_params()),
                (params, matmul),
                "{name} {family}"
            );
        }
    }

    #[test]
    fn preset_sizes_are_what_their_names_say() {
        let m = |p: &str| ModelConfig::preset(p, None).unwrap().param_count() as f64 / 1e6;
        assert!((0.8..1.5).contains(&m("tiny")), "tiny {}", m("tiny"));
        assert!((3.5..5.0).contains(&m("4m")), "4m {}", m("4m"));
        assert!((14.0..16.5).contains(&m("15m")), "15m {}", m("15m"));
        assert!(
            (123.0..125.0).contains(&m("gpt2-124m")),
            "gpt2-124m {}",
            m("gpt2-124m")
        );
        assert!(
            (1200.0..1250.0).contains(&m("llama-1b")),
            "llama-1b {}",
            m("llama-1b")
        );
    }

    #[test]
    fn every_preset_is_listed_valid_and_defaults_its_family() {
        assert_eq!(PRESETS, ["tiny", "4m", "15m", "gpt2-124m", "llama-1b"]);
        for preset in Preset::all() {
            let cfg = ModelConfig::preset(preset.name, None).unwrap();
            assert_eq!(cfg, preset.config);
            let family = if preset.name == "gpt2-124m" {
                Family::Gpt2
            } else {
                Family::Llama
            };
            assert_eq!(cfg.family, family, "{}", preset.name);
            assert!(preset.plan_micro_batch > 0);
        }
        let llama = ModelConfig::preset("llama-1b", None).unwrap();
        assert_eq!((llama.n_head, llama.n_kv_head), (32, 8));
    }

    #[test]
    fn unknown_preset_lists_the_known_ones() {
        let err = ModelConfig::preset("7b", None).unwrap_err().to_string();
        assert!(
            err.contains("unknown model preset '7b'")
                && err.contains("tiny, 4m, 15m, gpt2-124m, llama-1b"),
            "{err}"
        );
    }

    #[test]
    fn flops_are_six_per_matmul_parameter_plus_attention() {
        let gpt2 = ModelConfig::preset("gpt2-124m", None).unwrap();
        // llm.c's figure for GPT-2 124M at T=1024 is about 0.87 GFLOP per token.
        let gflops = gpt2.train_flops_per_token(1024) / 1e9;
        assert!((0.8..0.9).contains(&gflops), "{gflops}");
        let tiny = ModelConfig::preset("tiny", None).unwrap();
        let attention = 12.0 * (4 * 100 * 128) as f64;
        assert_eq!(
            tiny.train_flops_per_token(100),
            6.0 * tiny.matmul_params() as f64 + attention
        );
        assert_eq!(tiny.training_state_bytes(), 16 * 1_115_264);
    }

    #[test]
    fn invalid_configs_say_why() {
        let mut cfg = ModelConfig::preset("tiny", Some(Family::Llama)).unwrap();
        cfg.n_kv_head = 3;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(
            err.contains("n_head 4 is not a multiple of n_kv_head 3"),
            "{err}"
        );
        let mut cfg = ModelConfig::preset("tiny", Some(Family::Gpt2)).unwrap();
        cfg.n_kv_head = 2;
        assert!(
            cfg.validate()
                .unwrap_err()
                .to_string()
                .contains("grouped-query")
        );
        let err = ModelConfig::preset("llama-1b", Some(Family::Gpt2))
            .unwrap_err()
            .to_string();
        assert!(err.contains("n_kv_head 8 must equal n_head 32"), "{err}");
    }

    #[test]
    fn spec_overrides_apply_and_are_validated() {
        let spec: ModelSpec =
            toml::from_str("preset = \"tiny\"\nn_kv_head = 2\nvocab_size = 512").unwrap();
        let cfg = spec.resolve().unwrap();
        assert_eq!(
            (cfg.n_kv_head, cfg.vocab_size, cfg.family),
            (2, 512, Family::Llama)
        );
        let bad: Result<ModelSpec, _> = toml::from_str("preset = \"tiny\"\nlayers = 2");
        assert!(
            bad.unwrap_err()
                .to_string()
                .contains("unknown field `layers`")
        );
        let spec: ModelSpec = toml::from_str("preset = \"tiny\"\nd_model = 130").unwrap();
        assert!(
            spec.resolve()
                .unwrap_err()
                .to_string()
                .contains("not divisible")
        );
    }

    #[test]
    fn a_folder_architecture_must_agree_with_what_model_states() {
        let folder = ModelConfig {
            n_layer: 2,
            vocab_size: 300,
            ..ModelConfig::preset("tiny", None).unwrap()
        };
        let path = Path::new("hf/llama/config.json");
        let spec = |text: &str| -> ModelSpec {
            toml::from_str(&format!("init_from = \"hf/llama\"\n{text}")).unwrap()
        };
        // init_from alone, or with fields that agree.
        assert_eq!(spec("").resolve_with(&folder, path).unwrap(), folder);
        assert_eq!(
            spec("n_layer = 2\nfamily = \"llama\"\nnorm_eps = 1e-5")
                .resolve_with(&folder, path)
                .unwrap(),
            folder
        );
        let err = |text: &str| {
            spec(text)
                .resolve_with(&folder, path)
                .unwrap_err()
                .to_string()
        };
        let e = err("n_layer = 4");
        assert!(
            e.contains("[model] n_layer = 4 but hf/llama/config.json says num_hidden_layers = 2"),
            "{e}"
        );
        let e = err("family = \"gpt2\"");
        assert!(
            e.contains("family = gpt2 but") && e.contains("model_type = llama"),
            "{e}"
        );
        let e = err("norm_eps = 1e-6");
        assert!(e.contains("says rms_norm_eps = 0.00001"), "{e}");
        // A preset states every field: the first that differs is named.
        let e = err("preset = \"tiny\"");
        assert!(
            e.contains("[model] preset \"tiny\" has vocab_size = 2048")
                && e.contains("says vocab_size = 300"),
            "{e}"
        );
        let e = err("preset = \"tiny\"\nvocab_size = 300");
        assert!(e.contains("preset \"tiny\" has n_layer = 4"), "{e}");
        assert_eq!(
            spec("preset = \"tiny\"\nvocab_size = 300\nn_layer = 2")
                .resolve_with(&folder, path)
                .unwrap(),
            folder
        );
        // Without a folder read, resolve says so; without either, it asks for one.
        assert!(
            spec("")
                .resolve()
                .unwrap_err()
                .to_string()
                .contains("hf/llama/config.json")
        );
        let none = ModelSpec::default().resolve().unwrap_err().to_string();
        assert!(
            none.contains("name a preset") && none.contains("init_from"),
            "{none}"
        );
    }

    #[test]
    fn names_parse_and_print() {
        assert_eq!("gpt2".parse::<Family>().unwrap(), Family::Gpt2);
        assert_eq!(Family::Llama.to_string(), "llama");
        assert!(
            "mamba"
                .parse::<Family>()
                .unwrap_err()
                .to_string()
                .contains("use gpt2 or llama")
        );
        assert_eq!("bf16".parse::<Precision>().unwrap(), Precision::Bf16);
        assert_eq!(
            "bf16-pure".parse::<Precision>().unwrap(),
            Precision::Bf16Pure
        );
        assert!("fp8".parse::<Precision>().is_err());
    }
}
