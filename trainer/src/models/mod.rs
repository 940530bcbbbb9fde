//! The model zoo: one file per family, a serde [`ModelConfig`] with named presets, and
//! [`Model`], which builds either family on a `VarStore` path whose parameter names equal the
//! family's Hugging Face safetensors keys.

mod gpt2;
mod llama;
pub mod weights;

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor, nn};

pub use gpt2::Gpt2;
pub use llama::Llama;

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
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "gpt2" => Ok(Family::Gpt2),
            "llama" => Ok(Family::Llama),
            other => Err(Error::InvalidModelConfig(format!(
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

/// Preset names, in size order.
pub const PRESETS: &[&str] = &["tiny", "4m", "15m", "gpt2-124m"];

impl ModelConfig {
    /// A named preset. `family` defaults to llama, except for `gpt2-124m`.
    pub fn preset(name: &str, family: Option<Family>) -> Result<Self> {
        let default_family = if name == "gpt2-124m" {
            Family::Gpt2
        } else {
            Family::Llama
        };
        let family = family.unwrap_or(default_family);
        let base = |vocab_size, n_layer, n_head, d_model, d_ff, max_seq_len| ModelConfig {
            family,
            vocab_size,
            n_layer,
            n_head,
            n_kv_head: n_head,
            d_model,
            d_ff,
            max_seq_len,
            norm_eps: 1e-5,
            rope_theta: 10_000.0,
            tie_embeddings: true,
        };
        let cfg = match name {
            // ~1M parameters: CPU tests.
            "tiny" => base(2048, 4, 4, 128, 384, 256),
            // 4 layers, d=256, 4 heads, ffn 1024, vocab 2048.
            "4m" => base(2048, 4, 4, 256, 1024, 512),
            // llama2.c's 15M TinyStories model: 6 layers, d=288, 6 heads, ffn 768, 32k vocab.
            "15m" => base(32_000, 6, 6, 288, 768, 256),
            // GPT-2 small.
            "gpt2-124m" => base(50_257, 12, 12, 768, 3072, 1024),
            other => {
                return Err(Error::UnknownPreset {
                    name: other.to_string(),
                    known: PRESETS.join(", "),
                });
            }
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the invariants every forward pass relies on; explains what is wrong.
    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(Error::InvalidModelConfig(why));
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
    fn block_params(&self) -> i64 {
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

    /// Total trainable parameters (a tied head counts once).
    pub fn param_count(&self) -> i64 {
        let d = self.d_model;
        let embed = self.vocab_size * d;
        let positions = if self.family == Family::Gpt2 {
            self.max_seq_len * d
        } else {
            0
        };
        let final_norm = if self.family == Family::Gpt2 {
            2 * d
        } else {
            d
        };
        let head = if self.tie_embeddings {
            0
        } else {
            self.vocab_size * d
        };
        embed + positions + self.n_layer * self.block_params() + final_norm + head
    }

    /// Parameters that take part in matrix multiplies: every block weight plus the output head.
    /// Embedding lookups cost no FLOPs; the (tied) head does.
    pub fn matmul_params(&self) -> i64 {
        let d = self.d_model;
        let kv = self.n_kv_head * self.head_dim();
        let per_block = match self.family {
            Family::Gpt2 => 4 * d * d + 2 * d * self.d_ff,
            Family::Llama => 2 * d * d + 2 * d * kv + 3 * d * self.d_ff,
        };
        self.n_layer * per_block + self.vocab_size * d
    }

    /// Training FLOPs per token (forward + backward) at sequence length `seq_len`:
    /// 6 per matmul parameter plus 12·L·T·d for attention scores and values (PaLM appendix B).
    pub fn train_flops_per_token(&self, seq_len: i64) -> f64 {
        6.0 * self.matmul_params() as f64 + 12.0 * (self.n_layer * seq_len * self.d_model) as f64
    }
}

/// How a run config names a model: a preset, optionally with fields overridden.
///
/// ```toml
/// [model]
/// preset = "tiny"      # tiny | 4m | 15m | gpt2-124m
/// family = "llama"     # gpt2 | llama (default: llama, gpt2 for gpt2-124m)
/// vocab_size = 4096    # any ModelConfig field may be overridden
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub preset: String,
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
    pub fn resolve(&self) -> Result<ModelConfig> {
        let mut cfg = ModelConfig::preset(&self.preset, self.family)?;
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
}

/// The dtype matrix multiplies and attention run in. Parameters, norms, softmax and the loss
/// stay fp32 (what autocast does, made explicit because tch's autocast only knows fp16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    Bf16,
}

impl Precision {
    pub fn kind(self) -> Kind {
        match self {
            Precision::Fp32 => Kind::Float,
            Precision::Bf16 => Kind::BFloat16,
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fp32" => Ok(Precision::Fp32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(Error::InvalidModelConfig(format!(
                "unknown precision '{other}'; use fp32 or bf16"
            ))),
        }
    }
}

/// Casts `x` to the compute dtype when it differs (a no-op handle copy otherwise).
pub(crate) fn to_compute(x: &Tensor, kind: Kind) -> Tensor {
    if x.kind() == kind {
        x.shallow_clone()
    } else {
        x.to_kind(kind)
    }
}

/// Trainable variables of `vs` sorted by name: the one order that optimizer state, outer
/// gradients and every replica's flattened vectors use.
pub fn trainable_by_name(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut named: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// Rows of an embedding table: `table` (V, d), `ids` (...) → (..., d).
pub(crate) fn embed(table: &Tensor, ids: &Tensor) -> Tensor {
    Tensor::embedding(table, ids, -1, false, false)
}

/// A causal language model of either family.
#[derive(Debug)]
pub enum Model {
    Gpt2(Gpt2),
    Llama(Llama),
}

impl Model {
    /// Builds the model's parameters under `path` (normally `vs.root()`), randomly initialised.
    pub fn new(path: &nn::Path<'_>, cfg: &ModelConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(match cfg.family {
            Family::Gpt2 => Model::Gpt2(Gpt2::new(path, cfg)),
            Family::Llama => Model::Llama(Llama::new(path, cfg)),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        match self {
            Model::Gpt2(m) => &m.cfg,
            Model::Llama(m) => &m.cfg,
        }
    }

    /// Sets the dtype of matrix multiplies and attention.
    pub fn set_precision(&mut self, precision: Precision) {
        match self {
            Model::Gpt2(m) => m.compute = precision.kind(),
            Model::Llama(m) => m.compute = precision.kind(),
        }
    }

    /// `ids`: (B, T) int64 → logits (B, T, vocab) in fp32.
    pub fn forward(&self, ids: &Tensor) -> Tensor {
        match self {
            Model::Gpt2(m) => m.forward(ids),
            Model::Llama(m) => m.forward(ids),
        }
    }

    /// Mean next-token cross-entropy. `targets`: (B, T) int64; -1 is ignored.
    pub fn loss(&self, ids: &Tensor, targets: &Tensor) -> Tensor {
        let logits = self.forward(ids);
        cross_entropy(&logits, targets)
    }
}

/// Mean cross-entropy over (B, T, V) logits and (B, T) targets, ignoring index -1.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Tensor {
    let vocab = logits.size().last().copied().unwrap_or(1);
    logits.reshape([-1, vocab]).cross_entropy_loss::<Tensor>(
        &targets.reshape([-1]),
        None,
        tch::Reduction::Mean,
        -1,
        0.0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn counted(cfg: &ModelConfig) -> i64 {
        let vs = nn::VarStore::new(Device::Cpu);
        let _model = Model::new(&vs.root(), cfg).unwrap();
        vs.trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum()
    }

    #[test]
    fn analytic_param_count_matches_the_built_model() {
        for preset in ["tiny", "4m"] {
            for family in [Family::Gpt2, Family::Llama] {
                let cfg = ModelConfig::preset(preset, Some(family)).unwrap();
                assert_eq!(cfg.param_count(), counted(&cfg), "{preset} {family}");
            }
        }
        let mut gqa = ModelConfig::preset("tiny", Some(Family::Llama)).unwrap();
        gqa.n_kv_head = 2;
        gqa.tie_embeddings = false;
        assert_eq!(gqa.param_count(), counted(&gqa));
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
    }

    #[test]
    fn unknown_preset_lists_the_known_ones() {
        let err = ModelConfig::preset("7b", None).unwrap_err().to_string();
        assert!(err.contains("'7b'") && err.contains("gpt2-124m"), "{err}");
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
        let bad: std::result::Result<ModelSpec, _> =
            toml::from_str("preset = \"tiny\"\nlayers = 2");
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
    fn forward_shapes_and_initial_loss() {
        tch::manual_seed(0);
        for family in [Family::Gpt2, Family::Llama] {
            let cfg = ModelConfig::preset("tiny", Some(family)).unwrap();
            let vs = nn::VarStore::new(Device::Cpu);
            let model = Model::new(&vs.root(), &cfg).unwrap();
            let ids = Tensor::randint(cfg.vocab_size, [2, 16], (Kind::Int64, Device::Cpu));
            let logits = model.forward(&ids);
            assert_eq!(logits.size(), vec![2, 16, cfg.vocab_size]);
            // A fresh model predicts nearly uniformly: loss on unrelated targets near ln(vocab).
            let targets = Tensor::randint(cfg.vocab_size, [2, 16], (Kind::Int64, Device::Cpu));
            let loss = f64::try_from(model.loss(&ids, &targets)).unwrap();
            let uniform = (cfg.vocab_size as f64).ln();
            assert!(
                (loss - uniform).abs() < 0.5,
                "{family}: {loss} vs {uniform}"
            );
        }
    }
}
