//! Model profiles for the planner (built-in presets computed from architecture numbers, or a
//! TOML file) and node profiles (from a TOML nodes file or from a joining node's capabilities).
//!
//! The presets, the parameter counts and the bytes per parameter are the shared model
//! vocabulary of `forge_protocol::model`, so the planner and the trainer agree on every model.
//! Memory accounting assumes mixed-precision training as the trainer does it: fp32 weights and
//! gradients (8 bytes per parameter), AdamW moments in fp32 (8 bytes per parameter), the DiLoCo
//! outer state (fp32 global parameters and outer momentum, 8 bytes per parameter), bf16
//! activations saved for backward with flash attention (no sequence² term), fp32 logits for the
//! loss. The outer state lives in host memory on a GPU node; it is counted against the stage's
//! device all the same, so a GPU's budget errs on the safe side. FLOPs are 6 per parameter per token for the matrix multiplies plus 12·seq·d_model per
//! token per layer for attention.

use std::path::Path;

use forge_protocol::model::{
    ACTIVATION_BYTES, ADAMW_BYTES, DEFAULT_NORM_EPS, DEFAULT_ROPE_THETA, Family, LOGIT_BYTES,
    ModelConfig, OUTER_STATE_BYTES, PRESETS, Preset, WEIGHT_AND_GRAD_BYTES,
};
use forge_protocol::{Capabilities, DeviceKind};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::planner::{LayerProfile, ModelProfile, NodeProfile};

/// Share of a device's memory a stage may plan for; the rest is CUDA context, allocator
/// fragmentation and temporaries the profile does not count.
pub const USABLE_MEMORY_FRACTION: f64 = 0.9;

const GIB: f64 = (1u64 << 30) as f64;

/// Architecture numbers a profile is computed from, and the batch shape it is planned at; field
/// names follow the shared [`ModelConfig`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Architecture {
    pub family: Family,
    pub vocab_size: u64,
    pub n_layer: u64,
    pub n_head: u64,
    pub n_kv_head: u64,
    pub d_model: u64,
    pub d_ff: u64,
    /// Training sequence length (also gpt2's position table size).
    pub seq_len: u64,
    /// Sequences per micro-batch.
    pub micro_batch: u64,
    pub tie_embeddings: bool,
    /// gpt2's position table size when it is longer than `seq_len` (a run trained on shorter
    /// sequences than the model's maximum).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_seq_len: Option<u64>,
}

impl Architecture {
    /// A built-in preset, planned at its maximum sequence length and its default micro-batch.
    pub fn preset(name: &str) -> Result<Architecture> {
        let preset = Preset::named(name).map_err(|_| Error::UnknownPreset {
            name: name.to_string(),
            known: PRESETS.join(", "),
        })?;
        let cfg = &preset.config;
        let count = |value: i64| value as u64;
        Ok(Architecture {
            family: cfg.family,
            vocab_size: count(cfg.vocab_size),
            n_layer: count(cfg.n_layer),
            n_head: count(cfg.n_head),
            n_kv_head: count(cfg.n_kv_head),
            d_model: count(cfg.d_model),
            d_ff: count(cfg.d_ff),
            seq_len: count(cfg.max_seq_len),
            micro_batch: preset.plan_micro_batch,
            tie_embeddings: cfg.tie_embeddings,
            max_seq_len: None,
        })
    }

    /// A run's model (a resolved `[model]` table), planned at the run's sequence length and
    /// micro-batch.
    pub fn from_model(model: &ModelConfig, seq_len: u64, micro_batch: u64) -> Architecture {
        let count = |value: i64| value as u64;
        Architecture {
            family: model.family,
            vocab_size: count(model.vocab_size),
            n_layer: count(model.n_layer),
            n_head: count(model.n_head),
            n_kv_head: count(model.n_kv_head),
            d_model: count(model.d_model),
            d_ff: count(model.d_ff),
            seq_len,
            micro_batch,
            tie_embeddings: model.tie_embeddings,
            max_seq_len: Some(count(model.max_seq_len)),
        }
    }

    /// The shared model description these numbers stand for, so every parameter count comes
    /// from one place; `max_seq_len` (else `seq_len`) sizes gpt2's position table. Norm epsilon and RoPE base change
    /// no count, so the common defaults stand in for them.
    fn model_config(&self, name: &str) -> Result<ModelConfig> {
        let field = |field: &str, value: u64| {
            i64::try_from(value).map_err(|_| Error::InvalidProfile {
                name: name.to_string(),
                reason: format!("{field} {value} is too large"),
            })
        };
        Ok(ModelConfig {
            family: self.family,
            vocab_size: field("vocab_size", self.vocab_size)?,
            n_layer: field("n_layer", self.n_layer)?,
            n_head: field("n_head", self.n_head)?,
            n_kv_head: field("n_kv_head", self.n_kv_head)?,
            d_model: field("d_model", self.d_model)?,
            d_ff: field("d_ff", self.d_ff)?,
            max_seq_len: field("max_seq_len", self.max_seq_len.unwrap_or(self.seq_len))?,
            norm_eps: DEFAULT_NORM_EPS,
            rope_theta: DEFAULT_ROPE_THETA,
            tie_embeddings: self.tie_embeddings,
        })
    }

    /// The shared model checks, and a batch shape to plan at.
    fn validate(&self, name: &str) -> Result<()> {
        let bad = |reason: String| Error::InvalidProfile {
            name: name.to_string(),
            reason,
        };
        if self.micro_batch == 0 {
            return Err(bad("micro_batch must be positive".into()));
        }
        if let Some(max) = self.max_seq_len.filter(|&max| max < self.seq_len) {
            return Err(bad(format!(
                "seq_len {} exceeds max_seq_len {max}",
                self.seq_len
            )));
        }
        self.model_config(name)?
            .validate()
            .map_err(|e| bad(e.to_string()))
    }

    /// The planner's view: an embedding layer, `n_layer` blocks, and the final norm + head.
    pub fn profile(&self, name: &str) -> Result<ModelProfile> {
        self.validate(name)?;
        let cfg = self.model_config(name)?;
        let params = |count: i64| count as u64;
        let d = self.d_model;
        let tokens = self.micro_batch * self.seq_len;
        let kv = self.n_kv_head * (d / self.n_head);
        let boundary = tokens * d * ACTIVATION_BYTES;
        // Weights + gradients; AdamW moments + the DiLoCo outer state (global params, momentum).
        let state = |params: u64| {
            (
                params * WEIGHT_AND_GRAD_BYTES,
                params * (ADAMW_BYTES + OUTER_STATE_BYTES),
            )
        };

        let embedding = params(cfg.embedding_params());
        let (param_bytes, optimizer_bytes) = state(embedding + params(cfg.position_params()));
        let mut layers = vec![LayerProfile {
            name: "embed".to_string(),
            param_bytes,
            optimizer_bytes,
            activation_bytes: 0,
            flops: 0.0,
            output_bytes: boundary,
            tied_to: None,
            tied_bytes: 0,
        }];

        let matmul = params(cfg.block_matmul_params());
        let norms_and_biases = params(cfg.block_params()) - matmul;
        let hidden = match self.family {
            Family::Gpt2 => 2 * self.d_ff,
            Family::Llama => 3 * self.d_ff,
        };
        // Saved per token: both norm inputs and outputs, q, k, v, attention output, MLP hidden.
        let saved_per_token = 6 * d + 2 * kv + hidden;
        let attention_flops = 12.0 * (self.micro_batch * self.seq_len * self.seq_len * d) as f64;
        let (param_bytes, optimizer_bytes) = state(matmul + norms_and_biases);
        for index in 0..self.n_layer {
            layers.push(LayerProfile {
                name: format!("block.{index}"),
                param_bytes,
                optimizer_bytes,
                activation_bytes: tokens * saved_per_token * ACTIVATION_BYTES,
                flops: 6.0 * (matmul * tokens) as f64 + attention_flops,
                output_bytes: boundary,
                tied_to: None,
                tied_bytes: 0,
            });
        }

        let (param_bytes, optimizer_bytes) =
            state(params(cfg.final_norm_params()) + params(cfg.head_params()));
        let (tied_weights, tied_adam) = state(embedding);
        layers.push(LayerProfile {
            name: "head".to_string(),
            param_bytes,
            optimizer_bytes,
            activation_bytes: tokens * (2 * d * ACTIVATION_BYTES + self.vocab_size * LOGIT_BYTES),
            flops: 6.0 * (embedding * tokens) as f64,
            output_bytes: 0,
            tied_to: self.tie_embeddings.then_some(0),
            tied_bytes: if self.tie_embeddings {
                tied_weights + tied_adam
            } else {
                0
            },
        });
        let profile = ModelProfile {
            name: name.to_string(),
            tokens_per_micro_batch: tokens,
            layers,
        };
        profile.validate()?;
        Ok(profile)
    }
}

/// A custom profile file: either architecture numbers or an explicit list of layers.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileFile {
    name: Option<String>,
    architecture: Option<Architecture>,
    tokens_per_micro_batch: Option<u64>,
    #[serde(default)]
    layer: Vec<LayerEntry>,
}

/// One `[[layer]]` entry; `count` repeats it (names get `.0`, `.1`, ... appended).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LayerEntry {
    name: String,
    #[serde(default = "one")]
    count: u64,
    param_bytes: u64,
    optimizer_bytes: u64,
    activation_bytes: u64,
    flops: f64,
    output_bytes: u64,
    tied_to: Option<usize>,
    #[serde(default)]
    tied_bytes: u64,
}

fn one() -> u64 {
    1
}

/// A preset name or a path to a `.toml` profile; `micro_batch` and `seq_len` override the
/// architecture's (they do not apply to an explicit layer list).
pub fn load_model(
    model: &str,
    micro_batch: Option<u64>,
    seq_len: Option<u64>,
) -> Result<ModelProfile> {
    let with_overrides = |mut arch: Architecture| {
        arch.micro_batch = micro_batch.unwrap_or(arch.micro_batch);
        arch.seq_len = seq_len.unwrap_or(arch.seq_len);
        arch
    };
    if !model.ends_with(".toml") {
        return with_overrides(Architecture::preset(model)?).profile(model);
    }
    let path = Path::new(model);
    let text = std::fs::read_to_string(path).map_err(|cause| Error::Read {
        path: path.to_path_buf(),
        cause,
    })?;
    let file: ProfileFile = toml::from_str(&text).map_err(|cause| Error::Toml {
        path: path.to_path_buf(),
        cause,
    })?;
    let name = file.name.unwrap_or_else(|| model.to_string());
    match (file.architecture, file.layer.is_empty()) {
        (Some(arch), true) if file.tokens_per_micro_batch.is_none() => {
            with_overrides(arch).profile(&name)
        }
        (None, false) => {
            let tokens_per_micro_batch =
                file.tokens_per_micro_batch
                    .ok_or_else(|| Error::InvalidProfile {
                        name: name.clone(),
                        reason: "a [[layer]] list needs tokens_per_micro_batch".to_string(),
                    })?;
            let mut layers = Vec::new();
            for entry in file.layer {
                for index in 0..entry.count {
                    layers.push(LayerProfile {
                        name: if entry.count == 1 {
                            entry.name.clone()
                        } else {
                            format!("{}.{index}", entry.name)
                        },
                        param_bytes: entry.param_bytes,
                        optimizer_bytes: entry.optimizer_bytes,
                        activation_bytes: entry.activation_bytes,
                        flops: entry.flops,
                        output_bytes: entry.output_bytes,
                        tied_to: entry.tied_to,
                        tied_bytes: entry.tied_bytes,
                    });
                }
            }
            let profile = ModelProfile {
                name,
                tokens_per_micro_batch,
                layers,
            };
            profile.validate()?;
            Ok(profile)
        }
        _ => Err(Error::InvalidProfile {
            name,
            reason: "give either an [architecture] table or a [[layer]] list with \
                     tokens_per_micro_batch, not both and not neither"
                .to_string(),
        }),
    }
}

/// The nodes file of `forge-coordinator plan`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodesFile {
    node: Vec<NodeEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeEntry {
    name: String,
    /// Memory of each device (the smallest, if they differ), before headroom.
    memory_gib: f64,
    /// Effective (measured) training TFLOP/s of the whole node, not the datasheet peak.
    tflops: f64,
    upload_mbit_s: f64,
    download_mbit_s: f64,
}

/// Reads a nodes file; ids are the entries' positions.
pub fn load_nodes(path: &Path) -> Result<Vec<NodeProfile>> {
    let text = std::fs::read_to_string(path).map_err(|cause| Error::Read {
        path: path.to_path_buf(),
        cause,
    })?;
    let file: NodesFile = toml::from_str(&text).map_err(|cause| Error::Toml {
        path: path.to_path_buf(),
        cause,
    })?;
    let mut nodes = Vec::with_capacity(file.node.len());
    for (index, entry) in file.node.into_iter().enumerate() {
        for (field, value) in [
            ("memory_gib", entry.memory_gib),
            ("tflops", entry.tflops),
            ("upload_mbit_s", entry.upload_mbit_s),
            ("download_mbit_s", entry.download_mbit_s),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return Err(Error::InvalidNode {
                    name: entry.name,
                    reason: format!("{field} is {value}; it must be a positive number"),
                });
            }
        }
        nodes.push(NodeProfile {
            id: index as u64,
            memory_bytes: (entry.memory_gib * GIB * USABLE_MEMORY_FRACTION) as u64,
            flops_per_s: entry.tflops * 1e12,
            upload_bytes_per_s: entry.upload_mbit_s * 1e6 / 8.0,
            download_bytes_per_s: entry.download_mbit_s * 1e6 / 8.0,
            name: entry.name,
        });
    }
    if nodes.is_empty() {
        return Err(Error::InvalidNode {
            name: path.display().to_string(),
            reason: "the file lists no [[node]]".to_string(),
        });
    }
    Ok(nodes)
}

/// The planner's view of a joining node: its accelerators if it has any, else its CPU memory;
/// FLOP/s from its measured tokens/s on this model. A device that reports 0 bytes does not know
/// its memory (a CUDA build without the `nccl` feature): the node is taken to hold the whole
/// model, as every node did before the coordinator planned stages.
pub fn node_from_capabilities(
    id: u64,
    capabilities: &Capabilities,
    profile: &ModelProfile,
) -> NodeProfile {
    let has_gpu = capabilities
        .devices
        .iter()
        .any(|device| device.kind == DeviceKind::Cuda);
    let smallest = capabilities
        .devices
        .iter()
        .filter(|device| !has_gpu || device.kind == DeviceKind::Cuda)
        .map(|device| device.memory_bytes)
        .min()
        .unwrap_or(0);
    NodeProfile {
        id,
        name: format!("member {id}"),
        memory_bytes: match smallest {
            0 => u64::MAX,
            known => (known as f64 * USABLE_MEMORY_FRACTION) as u64,
        },
        flops_per_s: capabilities.tokens_per_s * profile.flops_per_token(),
        upload_bytes_per_s: capabilities.upload_bytes_per_s as f64,
        download_bytes_per_s: capabilities.download_bytes_per_s as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parameters(profile: &ModelProfile) -> u64 {
        profile.layers.iter().map(|l| l.param_bytes).sum::<u64>() / WEIGHT_AND_GRAD_BYTES
    }

    #[test]
    fn presets_have_the_published_parameter_counts() {
        let gpt2 = Architecture::preset("gpt2-124m")
            .unwrap()
            .profile("gpt2-124m")
            .unwrap();
        assert_eq!(parameters(&gpt2), 124_439_808);
        let llama = Architecture::preset("llama-1b")
            .unwrap()
            .profile("llama-1b")
            .unwrap();
        assert_eq!(parameters(&llama), 1_235_814_400);
        assert_eq!(llama.layers.len(), 18);
        // Tied head: the embedding is not counted twice on one node.
        assert_eq!(llama.layers[17].tied_to, Some(0));
        for name in PRESETS {
            let profile = load_model(name, None, None).unwrap();
            assert!(profile.flops_per_token() > 0.0, "{name}");
        }
    }

    #[test]
    fn presets_plan_with_the_shared_counts() {
        for name in PRESETS {
            let model = ModelConfig::preset(name, None).unwrap();
            let arch = Architecture::preset(name).unwrap();
            assert_eq!(arch.seq_len, model.max_seq_len as u64, "{name}");
            let profile = arch.profile(name).unwrap();
            assert_eq!(parameters(&profile), model.param_count() as u64, "{name}");
            let expected = model.train_flops_per_token(model.max_seq_len);
            let got = profile.flops_per_token();
            assert!(
                (got - expected).abs() <= 1e-9 * expected,
                "{name}: {got} vs {expected}"
            );
        }
        // An untied head gets its own weights in the last layer.
        let mut arch = Architecture::preset("tiny").unwrap();
        arch.tie_embeddings = false;
        let profile = arch.profile("untied").unwrap();
        let untied = ModelConfig {
            tie_embeddings: false,
            ..ModelConfig::preset("tiny", None).unwrap()
        };
        assert_eq!(parameters(&profile), untied.param_count() as u64);
        assert_eq!(profile.layers.last().unwrap().tied_to, None);
    }

    #[test]
    fn whole_model_memory_of_tiny_by_hand() {
        // The tiny preset (llama, vocab 2048, 4 layers, d 128, 4 heads, ffn 384, tied head) at
        // the tiny CPU run's shape: micro-batch 16 of 128 tokens.
        let model = ModelConfig::preset("tiny", None).unwrap();
        let profile = Architecture::from_model(&model, 128, 16)
            .profile("tiny")
            .unwrap();
        let params: u64 = 1_115_264;
        // fp32 weights 4 + grads 4 + AdamW moments 8 + outer global params 4 + momentum 4.
        let state = params * 24;
        let tokens: u64 = 16 * 128;
        // Per block and token, bf16: 2 norms in + out (4·128), q and attention out (2·128),
        // k and v (2·128), SwiGLU gate, up and product (3·384) = 2176 values × 2 bytes.
        let block = 2176 * 2;
        // Head, per token: final norm in + out in bf16 (2·128·2) and fp32 logits (2048·4).
        let head = 2 * 128 * 2 + 2048 * 4;
        let activations = tokens * (4 * block + head);
        assert_eq!(state, 26_766_336);
        assert_eq!(profile.whole_model_bytes(), state + activations);
        assert_eq!(profile.whole_model_bytes(), 80_243_712);
    }

    #[test]
    fn a_run_shorter_than_the_model_keeps_gpt2_position_table() {
        let model = ModelConfig::preset("gpt2-124m", None).unwrap();
        let short = Architecture::from_model(&model, 256, 4)
            .profile("gpt2")
            .unwrap();
        assert_eq!(parameters(&short), model.param_count() as u64);
        assert_eq!(short.tokens_per_micro_batch, 1024);
        let too_long = Architecture::from_model(&model, 2048, 4)
            .profile("gpt2")
            .unwrap_err()
            .to_string();
        assert!(
            too_long.contains("seq_len 2048 exceeds max_seq_len 1024"),
            "{too_long}"
        );
    }

    #[test]
    fn a_node_is_planned_with_its_smallest_accelerator_or_unknown_memory_as_whole() {
        let profile = load_model("tiny", None, None).unwrap();
        let device = |kind, memory_bytes| forge_protocol::Device {
            kind,
            name: "d".to_string(),
            memory_bytes,
        };
        let mut caps = crate::identity::simulated_capabilities("p".to_string());
        caps.devices = vec![
            device(DeviceKind::Cpu, 64 << 30),
            device(DeviceKind::Cuda, 2 << 30),
            device(DeviceKind::Cuda, 1 << 30),
        ];
        let node = node_from_capabilities(7, &caps, &profile);
        assert_eq!(
            node.memory_bytes,
            ((1u64 << 30) as f64 * USABLE_MEMORY_FRACTION) as u64
        );
        assert_eq!(node.flops_per_s, 1_000.0 * profile.flops_per_token());
        caps.devices[2].memory_bytes = 0;
        let unknown = node_from_capabilities(7, &caps, &profile);
        assert!(unknown.memory_bytes >= profile.whole_model_bytes());
        let plan = crate::planner::plan(&profile, &[unknown], 1);
        assert_eq!(plan.replicas.len(), 1);
        assert_eq!(plan.replicas[0].stages.len(), 1);
    }

    #[test]
    fn flops_per_token_is_six_per_parameter_plus_attention() {
        let gpt2 = Architecture::preset("gpt2-124m")
            .unwrap()
            .profile("gpt2-124m")
            .unwrap();
        // llm.c's figure for GPT-2 124M at T=1024 is about 0.87 GFLOP per token (with the
        // 6N + 12·L·d·T rule and the tied head counted in the matmuls).
        let gflops = gpt2.flops_per_token() / 1e9;
        assert!((0.8..0.9).contains(&gflops), "{gflops}");
    }

    #[test]
    fn overrides_change_the_activation_memory() {
        let small = load_model("llama-1b", Some(1), Some(512)).unwrap();
        let large = load_model("llama-1b", Some(2), Some(2048)).unwrap();
        assert_eq!(small.tokens_per_micro_batch, 512);
        assert!(large.whole_model_bytes() > small.whole_model_bytes());
    }

    #[test]
    fn unknown_preset_lists_the_known_ones() {
        let err = load_model("llama-70b", None, None).unwrap_err().to_string();
        assert!(err.contains("tiny, 4m, 15m, gpt2-124m, llama-1b"), "{err}");
    }

    #[test]
    fn custom_profile_files_in_both_forms() {
        let dir = std::env::temp_dir().join(format!("forge-profile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let layers = dir.join("layers.toml");
        std::fs::write(
            &layers,
            r#"
name = "handmade"
tokens_per_micro_batch = 1024
[[layer]]
name = "embed"
param_bytes = 100
optimizer_bytes = 100
activation_bytes = 0
flops = 0.0
output_bytes = 10
[[layer]]
name = "block"
count = 3
param_bytes = 200
optimizer_bytes = 200
activation_bytes = 50
flops = 1e9
output_bytes = 10
"#,
        )
        .unwrap();
        let profile = load_model(layers.to_str().unwrap(), None, None).unwrap();
        assert_eq!(profile.layers.len(), 4);
        assert_eq!(profile.layers[3].name, "block.2");

        let arch = dir.join("arch.toml");
        std::fs::write(
            &arch,
            r#"
[architecture]
family = "llama"
vocab_size = 32000
n_layer = 6
n_head = 6
n_kv_head = 6
d_model = 288
d_ff = 768
seq_len = 256
micro_batch = 16
tie_embeddings = true
"#,
        )
        .unwrap();
        let from_file = load_model(arch.to_str().unwrap(), None, None).unwrap();
        let preset = load_model("15m", None, None).unwrap();
        assert_eq!(from_file.layers, preset.layers);

        let typo = dir.join("typo.toml");
        std::fs::write(&typo, "name = \"x\"\ntokens_per_microbatch = 3\n").unwrap();
        let err = load_model(typo.to_str().unwrap(), None, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("tokens_per_microbatch"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn nodes_file_is_read_with_headroom_and_checked() {
        let dir = std::env::temp_dir().join(format!("forge-nodes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("nodes.toml");
        std::fs::write(
            &path,
            "[[node]]\nname = \"a\"\nmemory_gib = 10\ntflops = 2\nupload_mbit_s = 800\ndownload_mbit_s = 1000\n",
        )
        .unwrap();
        let nodes = load_nodes(&path).unwrap();
        assert_eq!(
            nodes[0].memory_bytes,
            (10.0 * GIB * USABLE_MEMORY_FRACTION) as u64
        );
        assert_eq!(nodes[0].upload_bytes_per_s, 100e6);
        std::fs::write(
            &path,
            "[[node]]\nname = \"a\"\nmemory_gib = 10\ntflops = 0\nupload_mbit_s = 800\ndownload_mbit_s = 1000\n",
        )
        .unwrap();
        let err = load_nodes(&path).unwrap_err().to_string();
        assert!(err.contains("tflops is 0"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
