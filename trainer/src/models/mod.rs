//! The model zoo: one file per family, and [`Model`], which builds either family on a
//! `VarStore` path whose parameter names equal the family's Hugging Face safetensors keys. The
//! descriptions it builds from ([`ModelConfig`], the presets, parameter and FLOP counts) live in
//! `forge_protocol::model`, shared with the coordinator's planner.

mod gpt2;
mod llama;
pub mod weights;

use crate::error::Result;
use tch::{Kind, Tensor, nn};

pub use forge_protocol::LayerRange;
pub use forge_protocol::model::{Family, ModelConfig, ModelSpec, PRESETS, Precision};
pub use gpt2::Gpt2;
pub use llama::Llama;

/// The compute dtype of a [`Precision`].
pub fn compute_kind(precision: Precision) -> Kind {
    match precision {
        Precision::Fp32 => Kind::Float,
        Precision::Bf16 => Kind::BFloat16,
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

/// Where a run's initial parameters come from.
pub enum Initial<'a> {
    /// Drawn on the CPU from this seed.
    Seed(u64),
    /// Written into a CPU var store of the whole model by this function (a Hugging Face
    /// folder's weights).
    Load(&'a dyn Fn(&mut nn::VarStore) -> Result<()>),
}

impl std::fmt::Debug for Initial<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Initial::Seed(seed) => write!(f, "Seed({seed})"),
            Initial::Load(_) => f.write_str("Load(..)"),
        }
    }
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
        Model::stage(path, cfg, LayerRange::whole(cfg.n_layer as u32))
    }

    /// Builds the parameters of the pipeline stage holding planner layers `layers` (0 the
    /// embeddings, 1..=n_layer the blocks, n_layer + 1 the final norm and head), under their
    /// whole-model names; a last stage with a tied head holds its own copy of the embedding.
    pub fn stage(path: &nn::Path<'_>, cfg: &ModelConfig, layers: LayerRange) -> Result<Self> {
        cfg.validate()?;
        layers
            .check(cfg.n_layer as u32)
            .map_err(|err| crate::error::Error::Pipeline(err.to_string()))?;
        Ok(match cfg.family {
            Family::Gpt2 => Model::Gpt2(Gpt2::stage(path, cfg, layers)),
            Family::Llama => Model::Llama(Llama::stage(path, cfg, layers)),
        })
    }

    /// Builds the model on `vs`'s device with the run's initial parameters: drawn on the CPU from
    /// `seed` and copied over, so every node and every device (CUDA draws differ from the CPU's,
    /// and between GPU models) starts from the same bits: version 0 of a DiLoCo run.
    pub fn seeded(vs: &mut nn::VarStore, cfg: &ModelConfig, seed: u64) -> Result<Self> {
        Model::seeded_stage(vs, cfg, seed, LayerRange::whole(cfg.n_layer as u32))
    }

    /// [`Model::seeded`] for a pipeline stage: its parameters are the whole model's of the same
    /// seed (drawn whole on the CPU, the stage's copied over), so a pipeline starts from the bits
    /// a whole replica does.
    pub fn seeded_stage(
        vs: &mut nn::VarStore,
        cfg: &ModelConfig,
        seed: u64,
        layers: LayerRange,
    ) -> Result<Self> {
        Model::initial_stage(vs, cfg, &Initial::Seed(seed), layers)
    }

    /// Builds the parameters of planner layers `layers` on `vs`'s device with the values
    /// `initial` gives the whole model on the CPU (the stage's are copied over).
    pub fn initial_stage(
        vs: &mut nn::VarStore,
        cfg: &ModelConfig,
        initial: &Initial<'_>,
        layers: LayerRange,
    ) -> Result<Self> {
        let mut cpu = nn::VarStore::new(tch::Device::Cpu);
        let model = {
            // libtorch's CPU generator is process-wide: hold it for every draw here (the
            // device's own, overwritten below, too), so no thread makes another's differ.
            let _rng = crate::rng();
            let model = Model::stage(&vs.root(), cfg, layers)?;
            if let Initial::Seed(seed) = initial {
                tch::manual_seed(*seed as i64);
            }
            Model::new(&cpu.root(), cfg)?;
            model
        };
        if let Initial::Load(load) = initial {
            load(&mut cpu)?;
        }
        vs.copy(&cpu).map_err(crate::error::Error::torch(
            "copying the initial parameters to the device",
        ))?;
        Ok(model)
    }

    pub fn config(&self) -> &ModelConfig {
        match self {
            Model::Gpt2(m) => &m.cfg,
            Model::Llama(m) => &m.cfg,
        }
    }

    /// Whether the model takes token ids (it holds the embeddings): a whole model or a
    /// pipeline's first stage. The others take the previous stage's output (B, T, d).
    pub fn takes_ids(&self) -> bool {
        match self {
            Model::Gpt2(m) => m.embeds,
            Model::Llama(m) => m.embeds,
        }
    }

    /// Whether the model returns logits (it holds the head): a whole model or a pipeline's
    /// last stage. The others return their output (B, T, d).
    pub fn gives_logits(&self) -> bool {
        match self {
            Model::Gpt2(m) => m.heads,
            Model::Llama(m) => m.heads,
        }
    }

    /// Sets the dtype of matrix multiplies and attention.
    pub fn set_precision(&mut self, precision: Precision) {
        match self {
            Model::Gpt2(m) => m.compute = compute_kind(precision),
            Model::Llama(m) => m.compute = compute_kind(precision),
        }
    }

    /// `ids`: (B, T) int64 → logits (B, T, vocab) in fp32. For a pipeline stage: the first
    /// takes `ids`, the others the previous stage's output (B, T, d) fp32; the last returns
    /// logits, the others their output (B, T, d) fp32.
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
    cross_entropy_reduced(logits, targets, tch::Reduction::Mean)
}

/// [`cross_entropy`] with another reduction (a pipeline's last stage sums, then divides by the
/// whole batch's counted tokens).
pub fn cross_entropy_reduced(
    logits: &Tensor,
    targets: &Tensor,
    reduction: tch::Reduction,
) -> Tensor {
    let vocab = logits.size().last().copied().unwrap_or(1);
    logits.reshape([-1, vocab]).cross_entropy_loss::<Tensor>(
        &targets.reshape([-1]),
        None,
        reduction,
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
        let _model = {
            let _rng = crate::rng();
            Model::new(&vs.root(), cfg).unwrap()
        };
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

    /// Version 0 of a run must not depend on the machine: the CPU draw is bit-identical
    /// whatever libtorch's thread count (nodes of one run set different `threads`).
    #[test]
    fn seeded_parameters_are_bit_identical_across_thread_counts() {
        let cfg = ModelConfig::preset("4m", Some(Family::Llama)).unwrap();
        let draw = |threads: i32| {
            tch::set_num_threads(threads);
            let mut vs = nn::VarStore::new(Device::Cpu);
            Model::seeded(&mut vs, &cfg, 1234).unwrap();
            let mut named = vs.variables().into_iter().collect::<Vec<_>>();
            named.sort_by(|a, b| a.0.cmp(&b.0));
            named
        };
        let before = tch::get_num_threads();
        let one = draw(1);
        let four = draw(4);
        tch::set_num_threads(before);
        assert_eq!(one.len(), four.len());
        for ((name, a), (_, b)) in one.iter().zip(&four) {
            assert!(a.equal(b), "{name} differs between 1 and 4 threads");
        }
        // And another seed draws other parameters (the comparison above can fail).
        let mut vs = nn::VarStore::new(Device::Cpu);
        Model::seeded(&mut vs, &cfg, 1235).unwrap();
        let other = vs.variables();
        assert!(
            !one.iter()
                .any(|(name, a)| name.contains("embed_tokens") && a.equal(&other[name]))
        );
    }

    #[test]
    fn forward_shapes_and_initial_loss() {
        let _rng = crate::rng();
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
