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
        Precision::Bf16 | Precision::Bf16Pure => Kind::BFloat16,
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

    /// [`Model::loss`] for evaluation (no gradients): the blocks run on
    /// [`BLOCK_CHUNK_TOKENS`] tokens' worth of sequences at a time and the head with its loss
    /// in chunks of at most [`HEAD_CHUNK_ELEMENTS`] logits, so that a large vocabulary's logits
    /// for a whole batch never exist at once (at sequence 1024, GPT-2's are 200 MB per
    /// sequence, twice over). The same value as [`Model::loss`] up to rounding. A pipeline
    /// stage's model (no ids in or no logits out) takes the plain forward.
    pub fn eval_loss(&self, ids: &Tensor, targets: &Tensor) -> Tensor {
        if !(self.takes_ids() && self.gives_logits()) {
            return self.loss(ids, targets);
        }
        let seq = ids.size().get(1).copied().unwrap_or(1).max(1);
        let sequences = (BLOCK_CHUNK_TOKENS / seq).max(1);
        let head_rows = (HEAD_CHUNK_ELEMENTS / self.config().vocab_size.max(1)).max(1);
        self.eval_loss_in(ids, targets, sequences, head_rows)
    }

    fn eval_loss_in(
        &self,
        ids: &Tensor,
        targets: &Tensor,
        block_rows: i64,
        head_rows: i64,
    ) -> Tensor {
        tch::no_grad(|| {
            let mut parts = Vec::new();
            for (start, len) in chunks(ids.size()[0], block_rows) {
                let mut x = self.embed_input(&ids.narrow(0, start, len));
                for i in 0..self.n_blocks() {
                    x = self.block(i, &x);
                }
                parts.push(x);
            }
            let stream = Tensor::cat(&parts, 0);
            let d = *stream.size().last().expect("a (B, T, d) stream");
            let last = stream.reshape([-1, d]);
            let flat_targets = targets.reshape([-1]);
            let valid = flat_targets.ne(-1).sum(Kind::Float);
            let mut sum = Tensor::zeros([], (Kind::Float, last.device()));
            for (start, len) in chunks(last.size()[0], head_rows) {
                let logits = self.head(&last.narrow(0, start, len).unsqueeze(0));
                let chunk = cross_entropy_reduced(
                    &logits,
                    &flat_targets.narrow(0, start, len),
                    tch::Reduction::Sum,
                );
                let _ = sum.g_add_(&chunk);
            }
            sum / valid
        })
    }

    /// [`Model::loss`] times `scale` and its gradients with respect to `params`, recomputing
    /// each block's activations in backward (activation checkpointing): the forward keeps only
    /// the residual stream entering each block, and the backward runs each block's forward
    /// again, from the last to the first, to take its gradients. The head and the loss run in
    /// chunks of tokens whose logits take at most [`HEAD_CHUNK_ELEMENTS`] values, so that the
    /// logits of a large vocabulary never exist all at once either, and the blocks run on
    /// [`BLOCK_CHUNK_TOKENS`] tokens' worth of sequences at a time, so that one block's
    /// activations for a few sequences are all that exists beside the stream. Gradients equal
    /// the plain backward's up to rounding; a parameter the loss does not use gets an undefined
    /// tensor.
    pub fn recomputed_gradients(
        &self,
        params: &[Tensor],
        ids: &Tensor,
        targets: &Tensor,
        scale: f64,
    ) -> (Tensor, Vec<Tensor>) {
        let rows = (HEAD_CHUNK_ELEMENTS / self.config().vocab_size.max(1)).max(1);
        let seq = ids.size().get(1).copied().unwrap_or(1).max(1);
        let sequences = (BLOCK_CHUNK_TOKENS / seq).max(1);
        self.recomputed_gradients_in(params, ids, targets, scale, rows, sequences)
    }

    /// [`Model::recomputed_gradients`] with the head in chunks of `chunk_rows` tokens and the
    /// blocks in chunks of `block_rows` sequences.
    fn recomputed_gradients_in(
        &self,
        params: &[Tensor],
        ids: &Tensor,
        targets: &Tensor,
        scale: f64,
        chunk_rows: i64,
        block_rows: i64,
    ) -> (Tensor, Vec<Tensor>) {
        let n = self.n_blocks();
        // Sequences `start..start + len` of the batch, for each chunk of `block_rows`.
        let row_chunks = chunks(ids.size()[0], block_rows);
        // The stream entering each block, without the graph that made it. A block runs on a
        // few sequences at a time: its activations (attention's scores are T² per head and
        // sequence) exist for those only.
        let inputs: Vec<Tensor> = tch::no_grad(|| {
            let mut x = self.embed_input(ids);
            let mut inputs = Vec::with_capacity(n);
            for i in 0..n {
                let parts: Vec<Tensor> = row_chunks
                    .iter()
                    .map(|&(start, len)| self.block(i, &x.narrow(0, start, len)))
                    .collect();
                let next = Tensor::cat(&parts, 0);
                inputs.push(x);
                x = next;
            }
            inputs.push(x);
            inputs
        });
        let mut grads: Vec<Tensor> = (0..params.len()).map(|_| Tensor::new()).collect();
        // Gradients of `out` (a loss, or a part's output times its upstream gradient: the
        // vector-Jacobian product) with respect to the parameters and, when given, the part's
        // input; the parameters' are summed in.
        let mut backward = |out: &Tensor, input: Option<&Tensor>| -> Option<Tensor> {
            let mut wrt: Vec<&Tensor> = params.iter().collect();
            wrt.extend(input);
            let mut got = Tensor::run_backward(&[out], &wrt, false, false);
            let input_grad = input.map(|_| got.pop().expect("one gradient per input"));
            crate::optim::accumulate(&mut grads, got);
            input_grad
        };
        // The head and the mean loss over the valid targets, chunk by chunk.
        let size = inputs[n].size();
        let d = *size.last().expect("a (B, T, d) stream");
        let last = inputs[n].reshape([-1, d]);
        let flat_targets = targets.reshape([-1]);
        let valid = f64::try_from(flat_targets.ne(-1).sum(Kind::Float)).unwrap_or(0.0);
        let per_token = scale / valid.max(1.0);
        let mut loss = Tensor::zeros([], (Kind::Float, last.device()));
        let mut upstream = Vec::new();
        for (start, len) in chunks(last.size()[0], chunk_rows) {
            let x = last
                .narrow(0, start, len)
                .unsqueeze(0)
                .set_requires_grad(true);
            let chunk = cross_entropy_reduced(
                &self.head(&x),
                &flat_targets.narrow(0, start, len),
                tch::Reduction::Sum,
            ) * per_token;
            let _ = loss.g_add_(&chunk.detach());
            upstream.push(backward(&chunk, Some(&x)).expect("the head's input gradient"));
        }
        let mut upstream = Tensor::cat(&upstream, 1).reshape(&size[..]);
        for i in (0..n).rev() {
            // Recomputed a few sequences at a time, like the forward.
            let parts: Vec<Tensor> = row_chunks
                .iter()
                .map(|&(start, len)| {
                    let x = inputs[i]
                        .narrow(0, start, len)
                        .detach()
                        .set_requires_grad(true);
                    let vjp = (self.block(i, &x) * upstream.narrow(0, start, len)).sum(Kind::Float);
                    backward(&vjp, Some(&x)).expect("a block's input gradient")
                })
                .collect();
            upstream = Tensor::cat(&parts, 0);
        }
        if self.takes_ids() {
            let vjp = (self.embed_input(ids) * &upstream).sum(Kind::Float);
            backward(&vjp, None);
        }
        (loss, grads)
    }

    fn embed_input(&self, input: &Tensor) -> Tensor {
        match self {
            Model::Gpt2(m) => m.embed_input(input),
            Model::Llama(m) => m.embed_input(input),
        }
    }

    fn n_blocks(&self) -> usize {
        match self {
            Model::Gpt2(m) => m.n_blocks(),
            Model::Llama(m) => m.n_blocks(),
        }
    }

    fn block(&self, i: usize, x: &Tensor) -> Tensor {
        match self {
            Model::Gpt2(m) => m.block(i, x),
            Model::Llama(m) => m.block(i, x),
        }
    }

    fn head(&self, x: &Tensor) -> Tensor {
        match self {
            Model::Gpt2(m) => m.head(x),
            Model::Llama(m) => m.head(x),
        }
    }
}

/// `0..total` in consecutive `(start, len)` pieces of `size` (at least 1), the last shorter.
fn chunks(total: i64, size: i64) -> Vec<(i64, i64)> {
    let size = size.max(1);
    (0..total)
        .step_by(size as usize)
        .map(|start| (start, size.min(total - start)))
        .collect()
}

/// Logits values (tokens × vocabulary) the checkpointed head computes at once: 64 MB in fp32.
pub const HEAD_CHUNK_ELEMENTS: i64 = 1 << 24;

/// Tokens a checkpointed block runs on at once (whole sequences, at least one): its
/// activations exist for these only, in the forward and in the recomputation.
pub const BLOCK_CHUNK_TOKENS: i64 = 2048;

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

    /// Activation checkpointing changes where activations come from, not the gradients: every
    /// parameter's gradient equals the plain backward's within 1e-6 (fp32), for both families,
    /// tied and untied heads, and the loss is the same.
    #[test]
    fn recomputed_gradients_equal_the_plain_backward() {
        let mut untied = ModelConfig::preset("tiny", Some(Family::Llama)).unwrap();
        untied.tie_embeddings = false;
        untied.n_kv_head = 2;
        let cases = [
            (
                "gpt2",
                ModelConfig::preset("tiny", Some(Family::Gpt2)).unwrap(),
            ),
            (
                "llama",
                ModelConfig::preset("tiny", Some(Family::Llama)).unwrap(),
            ),
            ("llama untied, grouped-query", untied),
        ];
        for (name, mut cfg) in cases {
            cfg.vocab_size = 300;
            let mut vs = nn::VarStore::new(Device::Cpu);
            let model = Model::seeded(&mut vs, &cfg, 7).unwrap();
            let params: Vec<Tensor> = trainable_by_name(&vs).into_iter().map(|(_, t)| t).collect();
            let ids = Tensor::randint(300, [3, 24], (Kind::Int64, Device::Cpu));
            let targets = Tensor::randint(300, [3, 24], (Kind::Int64, Device::Cpu));
            let plain_loss = model.loss(&ids, &targets) * 0.5;
            let refs: Vec<&Tensor> = params.iter().collect();
            let plain = Tensor::run_backward(&[&plain_loss], &refs, false, false);
            let (loss, recomputed) = model.recomputed_gradients(&params, &ids, &targets, 0.5);
            // And with the head in chunks of 10 tokens (8 chunks, the last of 2)
            // And with the blocks one sequence at a time (3 chunks).
            let (chunked_loss, chunked) =
                model.recomputed_gradients_in(&params, &ids, &targets, 0.5, 10, 1);
            let chunked_diff = f64::try_from((&chunked_loss - &plain_loss).abs()).unwrap();
            assert!(
                chunked_diff < 1e-6,
                "{name}: chunked loss differs by {chunked_diff}"
            );
            for (a, b) in plain.iter().zip(&chunked) {
                let diff = f64::try_from((a - b).abs().max()).unwrap();
                assert!(diff <= 1e-6, "{name}: chunked gradients differ by {diff}");
            }
            let loss_diff = f64::try_from((&loss - &plain_loss).abs()).unwrap();
            assert!(loss_diff < 1e-6, "{name}: loss differs by {loss_diff}");
            let mut worst = 0.0f64;
            for (a, b) in plain.iter().zip(&recomputed) {
                assert!(
                    a.defined() && b.defined(),
                    "{name}: every parameter has a gradient"
                );
                worst = worst.max(f64::try_from((a - b).abs().max()).unwrap());
            }
            println!("{name}: {} gradients, max |Δ| {worst:.3e}", plain.len());
            // The evaluation's chunked loss (sequence by sequence, 10 tokens of logits at a
            // time) is the plain one.
            let eval = model.eval_loss_in(&ids, &targets, 1, 10);
            let eval_diff = f64::try_from((&eval * 0.5 - &plain_loss).abs()).unwrap();
            assert!(
                eval_diff < 1e-6,
                "{name}: evaluation loss differs by {eval_diff}"
            );
            let eval = model.eval_loss(&ids, &targets);
            let eval_diff = f64::try_from((&eval * 0.5 - &plain_loss).abs()).unwrap();
            assert!(
                eval_diff < 1e-6,
                "{name}: evaluation loss differs by {eval_diff}"
            );
            assert!(worst <= 1e-6, "{name}: gradients differ by {worst}");
        }
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
