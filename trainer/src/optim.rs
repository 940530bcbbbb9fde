//! Inner optimizers: AdamW (decoupled weight decay on matrices only), Muon (Newton–Schulz
//! orthogonalised momentum for the hidden weight matrices, AdamW for the rest) and Adafactor
//! (factored second moments), as PyTorch's `torch.optim` computes them, and global-norm
//! gradient clipping. The state (moments and step) is explicit so checkpoints can save it and
//! joiners can be given it.
//!
//! Gradients are explicit too: [`Optimizer::gradients`] returns fresh tensors (autograd.grad)
//! instead of accumulating into each parameter's `.grad`, which saves a zeroing pass and an
//! accumulation pass per step (tch cannot reset `.grad` to None) and gives data-parallel
//! reducers one ordered list to average.

use crate::error::{Error, Result};
use crate::models::trainable_by_name;
use std::collections::HashMap;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor, nn::VarStore};

pub use forge_protocol::run_config::{
    AdafactorConfig, AdamWConfig, MuonConfig, MuonLrAdjust, NsPrecision, OptimizerConfig,
    OptimizerKind,
};

/// Muon's Newton–Schulz coefficients (Keller Jordan's, as `torch.optim.Muon` uses them).
const NS_COEFFICIENTS: (f64, f64, f64) = (3.4445, -4.7750, 2.0315);
/// Muon's floor of the gradient norm before Newton–Schulz.
const MUON_EPS: f64 = 1e-7;

/// How one parameter is updated, with its state.
#[derive(Debug)]
enum Rule {
    AdamW {
        exp_avg: Tensor,
        exp_avg_sq: Tensor,
        decay: bool,
    },
    Muon {
        momentum_buffer: Tensor,
        /// (fan_out, fan_in): the matrix as `nn.Linear` holds it (GPT-2's Conv1D holds the
        /// transpose), for the learning-rate adjustment.
        fans: (i64, i64),
    },
    /// Factored over the last two dimensions for a matrix, a full second moment for a vector.
    Adafactor {
        row_var: Option<Tensor>,
        col_var: Option<Tensor>,
        variance: Option<Tensor>,
    },
}

#[derive(Debug)]
struct ParamState {
    name: String,
    param: Tensor,
    rule: Rule,
}

/// The inner optimizer over every trainable variable of a `VarStore`, in name order.
#[derive(Debug)]
pub struct Optimizer {
    adamw: AdamWConfig,
    cfg: OptimizerConfig,
    params: Vec<ParamState>,
    step: i64,
}

/// Whether Muon takes `name` (a 2-D parameter): the hidden weight matrices, not the embeddings
/// or the head, which stay with AdamW as Muon's authors and PyTorch's docs advise.
fn muon_takes(name: &str) -> bool {
    ![
        "embed_tokens.weight",
        "wte.weight",
        "wpe.weight",
        "lm_head.weight",
    ]
    .iter()
    .any(|s| name.ends_with(s))
}

/// A GPT-2 block's Conv1D weight, stored (fan_in, fan_out).
fn conv1d_layout(name: &str) -> bool {
    name.contains(".attn.c_") || name.contains(".mlp.c_")
}

fn adamw_rule(param: &Tensor) -> Rule {
    Rule::AdamW {
        decay: param.dim() >= 2,
        exp_avg: param.zeros_like(),
        exp_avg_sq: param.zeros_like(),
    }
}

fn rule_for(kind: OptimizerKind, name: &str, param: &Tensor) -> Rule {
    match kind {
        OptimizerKind::Adamw => adamw_rule(param),
        OptimizerKind::Muon if param.dim() == 2 && muon_takes(name) => {
            let size = param.size();
            let fans = if conv1d_layout(name) {
                (size[1], size[0])
            } else {
                (size[0], size[1])
            };
            Rule::Muon {
                momentum_buffer: param.zeros_like(),
                fans,
            }
        }
        OptimizerKind::Muon => adamw_rule(param),
        OptimizerKind::Adafactor if param.dim() >= 2 => {
            let size = param.size();
            let n = size.len();
            let mut rows = size.clone();
            rows[n - 1] = 1;
            let mut cols = size;
            cols[n - 2] = 1;
            let zeros = |shape: &[i64]| Tensor::zeros(shape, (param.kind(), param.device()));
            Rule::Adafactor {
                row_var: Some(zeros(&rows)),
                col_var: Some(zeros(&cols)),
                variance: None,
            }
        }
        OptimizerKind::Adafactor => Rule::Adafactor {
            row_var: None,
            col_var: None,
            variance: Some(param.zeros_like()),
        },
    }
}

/// The number format of Newton–Schulz on `device` ([`NsPrecision`]).
fn ns_kind(precision: NsPrecision, device: Device) -> Kind {
    match precision {
        NsPrecision::Bf16 => Kind::BFloat16,
        NsPrecision::Fp32 => Kind::Float,
        NsPrecision::Auto if device.is_cuda() => Kind::BFloat16,
        NsPrecision::Auto => Kind::Float,
    }
}

/// `torch.optim.Muon`'s orthogonalisation: the quintic Newton–Schulz iteration, in `kind`
/// (PyTorch's is bf16).
fn zeropower_newton_schulz(grad: &Tensor, steps: u32, kind: Kind) -> Tensor {
    let (a, b, c) = NS_COEFFICIENTS;
    let tall = grad.size()[0] > grad.size()[1];
    let g = grad.to_kind(kind);
    let g = if tall { g.tr() } else { g };
    // Out of place: a gradient already of `kind` is `grad` itself (PyTorch would scale it in
    // place).
    let mut x = &g / g.norm().clamp_min(MUON_EPS);
    // addmm with beta and alpha (tch's addmm has neither): baddbmm on a batch of one.
    let addmm = |input: &Tensor, m1: &Tensor, m2: &Tensor, beta: f64, alpha: f64| {
        input
            .unsqueeze(0)
            .baddbmm(&m1.unsqueeze(0), &m2.unsqueeze(0), beta, alpha)
            .squeeze_dim(0)
    };
    for _ in 0..steps {
        let gram = x.matmul(&x.tr());
        let update = addmm(&gram, &gram, &gram, b, c);
        x = addmm(&x, &update, &x, a, 1.0);
    }
    if tall {
        x = x.tr();
    }
    x
}

/// `torch.optim.Muon`'s per-matrix learning-rate adjustment.
fn muon_lr(lr: f64, adjust: MuonLrAdjust, (fan_out, fan_in): (i64, i64)) -> f64 {
    let (a, b) = (fan_out as f64, fan_in as f64);
    match adjust {
        MuonLrAdjust::Original => lr * (a / b).max(1.0).sqrt(),
        MuonLrAdjust::MatchRmsAdamw => lr * 0.2 * a.max(b).sqrt(),
        MuonLrAdjust::None => lr,
    }
}

impl Optimizer {
    /// AdamW for every parameter: matrices (2-D and up: linear weights and embeddings) get
    /// weight decay; vectors (norm gains, biases) do not.
    pub fn adamw(vs: &VarStore, adamw: AdamWConfig) -> Self {
        Optimizer::new(vs, &OptimizerConfig::default(), adamw)
    }

    /// The optimizer `cfg` names; `adamw` configures AdamW wherever it is used (all parameters,
    /// or Muon's others).
    pub fn new(vs: &VarStore, cfg: &OptimizerConfig, adamw: AdamWConfig) -> Self {
        let params = trainable_by_name(vs)
            .into_iter()
            .map(|(name, param)| ParamState {
                rule: rule_for(cfg.kind, &name, &param),
                name,
                param,
            })
            .collect();
        Optimizer {
            adamw,
            cfg: *cfg,
            params,
            step: 0,
        }
    }

    /// The parameters, in this optimizer's order (handles sharing their storage).
    pub fn parameters(&self) -> Vec<Tensor> {
        self.params
            .iter()
            .map(|s| s.param.shallow_clone())
            .collect()
    }

    /// Number of optimizer steps taken.
    pub fn step_count(&self) -> i64 {
        self.step
    }

    /// Gradients of `loss` with respect to every parameter, in this optimizer's order. A
    /// parameter that does not affect the loss gets an undefined tensor.
    pub fn gradients(&self, loss: &Tensor) -> Vec<Tensor> {
        let params: Vec<&Tensor> = self.params.iter().map(|s| &s.param).collect();
        Tensor::run_backward(&[loss], &params, false, false)
    }

    /// One step at learning rate `lr` with `grads` from [`Optimizer::gradients`]. Parameters
    /// whose gradient is undefined are left untouched. A bf16 parameter (`precision =
    /// "bf16-pure"`) and its bf16 state are updated in fp32 and rounded back stochastically
    /// ([`stochastic_round_into`]), so that updates smaller than bf16's spacing still move
    /// them in expectation.
    pub fn step(&mut self, lr: f64, grads: &[Tensor]) {
        assert_eq!(grads.len(), self.params.len(), "one gradient per parameter");
        self.step += 1;
        let step = self.step;
        let (adamw, cfg) = (self.adamw, self.cfg);
        tch::no_grad(|| {
            for (index, (s, grad)) in self.params.iter_mut().zip(grads).enumerate() {
                if !grad.defined() {
                    continue;
                }
                if s.param.kind() != Kind::BFloat16 {
                    apply_rule(&adamw, &cfg, step, lr, &mut s.param, grad, &mut s.rule);
                    continue;
                }
                let mut param = s.param.to_kind(Kind::Float);
                let mut rule = s.rule.to_kind(Kind::Float);
                let grad = grad.to_kind(Kind::Float);
                apply_rule(&adamw, &cfg, step, lr, &mut param, &grad, &mut rule);
                let key = |part: usize| rounding_key(step, index, part);
                stochastic_round_into(&mut s.param, &param, key(0));
                for (part, ((_, mut mine), (_, updated))) in state_parts(&s.rule)
                    .into_iter()
                    .zip(state_parts(&rule))
                    .enumerate()
                {
                    stochastic_round_into(&mut mine, &updated, key(part + 1));
                }
            }
        });
    }

    /// The optimizer state as named tensors (`<param>.exp_avg` and `<param>.exp_avg_sq` for
    /// AdamW, `<param>.momentum_buffer` for Muon, `<param>.row_var` / `.col_var` / `.variance`
    /// for Adafactor, and `step`), for checkpoints and joiners.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = self
            .params
            .iter()
            .flat_map(|s| {
                state_parts(&s.rule)
                    .into_iter()
                    .map(|(part, t)| (format!("{}.{part}", s.name), t.shallow_clone()))
            })
            .collect();
        out.push(("step".into(), Tensor::from_slice(&[self.step])));
        out
    }

    /// Restores state written by [`Optimizer::state_tensors`]; every tensor must be present
    /// with its shape (state another optimizer wrote is refused, naming what it lacks).
    pub fn load_state_tensors(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let kind = self.cfg.kind;
        let missing = |name: &str| Error::Checkpoint {
            path: PathBuf::from("optimizer.safetensors"),
            why: format!(
                "optimizer state has no tensor {name} of the right shape (this run's optimizer \
                 is {kind:?}; state another optimizer wrote does not load into it)"
            ),
        };
        let step = tensors.get("step").ok_or_else(|| missing("step"))?;
        let step = i64::try_from(step.reshape([-1]).get(0)).map_err(|_| missing("step"))?;
        let mut loaded = Vec::new();
        for s in &self.params {
            for (part, like) in state_parts(&s.rule) {
                let name = format!("{}.{part}", s.name);
                match tensors.get(&name) {
                    Some(t) if t.size() == like.size() => loaded.push((like, t.shallow_clone())),
                    _ => return Err(missing(&name)),
                }
            }
        }
        tch::no_grad(|| {
            for (mut mine, theirs) in loaded {
                mine.copy_(&theirs.to_kind(mine.kind()).to_device(mine.device()));
            }
        });
        self.step = step;
        Ok(())
    }
}

/// A rule's state tensors by part name (handles sharing the storage).
fn state_parts(rule: &Rule) -> Vec<(&'static str, Tensor)> {
    match rule {
        Rule::AdamW {
            exp_avg,
            exp_avg_sq,
            ..
        } => vec![
            ("exp_avg", exp_avg.shallow_clone()),
            ("exp_avg_sq", exp_avg_sq.shallow_clone()),
        ],
        Rule::Muon {
            momentum_buffer, ..
        } => vec![("momentum_buffer", momentum_buffer.shallow_clone())],
        Rule::Adafactor {
            row_var,
            col_var,
            variance,
        } => [
            ("row_var", row_var),
            ("col_var", col_var),
            ("variance", variance),
        ]
        .into_iter()
        .filter_map(|(part, t)| t.as_ref().map(|t| (part, t.shallow_clone())))
        .collect(),
    }
}

impl Rule {
    /// A copy of the rule with its state tensors in `kind`.
    fn to_kind(&self, kind: Kind) -> Rule {
        let conv = |t: &Tensor| t.to_kind(kind);
        match self {
            Rule::AdamW {
                exp_avg,
                exp_avg_sq,
                decay,
            } => Rule::AdamW {
                exp_avg: conv(exp_avg),
                exp_avg_sq: conv(exp_avg_sq),
                decay: *decay,
            },
            Rule::Muon {
                momentum_buffer,
                fans,
            } => Rule::Muon {
                momentum_buffer: conv(momentum_buffer),
                fans: *fans,
            },
            Rule::Adafactor {
                row_var,
                col_var,
                variance,
            } => Rule::Adafactor {
                row_var: row_var.as_ref().map(conv),
                col_var: col_var.as_ref().map(conv),
                variance: variance.as_ref().map(conv),
            },
        }
    }
}

/// One parameter's update by its rule.
fn apply_rule(
    adamw: &AdamWConfig,
    cfg: &OptimizerConfig,
    step: i64,
    lr: f64,
    param: &mut Tensor,
    grad: &Tensor,
    rule: &mut Rule,
) {
    match rule {
        Rule::AdamW {
            exp_avg,
            exp_avg_sq,
            decay,
        } => adamw_step(adamw, step, lr, param, grad, exp_avg, exp_avg_sq, *decay),
        Rule::Muon {
            momentum_buffer,
            fans,
        } => muon_step(&cfg.muon, lr, param, grad, momentum_buffer, *fans),
        Rule::Adafactor {
            row_var,
            col_var,
            variance,
        } => adafactor_step(
            &cfg.adafactor,
            step,
            lr,
            param,
            grad,
            row_var.as_mut(),
            col_var.as_mut(),
            variance.as_mut(),
        ),
    }
}

/// Elements a stochastic rounding works on at once (its integer temporaries are 8 bytes each).
const ROUNDING_CHUNK: i64 = 1 << 20;

/// The key of the rounding noise of `part` (0: the parameter, 1..: its state tensors) of
/// parameter `index` at `step`: the same on every data-parallel worker, so that their copies
/// stay identical, and on a resumed run.
fn rounding_key(step: i64, index: usize, part: usize) -> i64 {
    let mut h = forge_protocol::rng::SplitMix64::new(
        (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((index as u64) << 8) ^ part as u64,
    );
    (h.next_u64() & 0xFFFF_FFFF) as i64
}

/// Writes fp32 `src` into bf16 `dst`, each value rounded up or down to a neighbouring bf16
/// with probabilities that make the result unbiased: 16 bits of noise are added to the fp32
/// bit pattern below bf16's last bit, and those bits are dropped. The noise is a hash of the
/// element's index and `key` (computed in int64 without overflow), so the rounding is
/// deterministic for a key and independent of any random generator. Values that bf16 holds
/// exactly are kept.
pub fn stochastic_round_into(dst: &mut Tensor, src: &Tensor, key: i64) {
    const MASK32: i64 = 0xFFFF_FFFF;
    const MUL: i64 = 0x045D_9F3B;
    let flat_src = src.to_kind(Kind::Float).contiguous().reshape([-1]);
    let flat_dst = dst.reshape([-1]);
    let n = flat_src.numel() as i64;
    let device = src.device();
    let mut start = 0;
    while start < n {
        let len = ROUNDING_CHUNK.min(n - start);
        let mut x = Tensor::arange_start(start, start + len, (Kind::Int64, device));
        let _ = x.g_add_scalar_(key);
        let _ = x.bitwise_and_(MASK32);
        for _ in 0..2 {
            let shifted = x.bitwise_right_shift_tensor_scalar(16);
            let _ = x.bitwise_xor_tensor_(&shifted);
            let _ = x.g_mul_scalar_(MUL);
            let _ = x.bitwise_and_(MASK32);
        }
        let shifted = x.bitwise_right_shift_tensor_scalar(16);
        let _ = x.bitwise_xor_tensor_(&shifted);
        let noise = x.bitwise_and(0xFFFF).to_kind(Kind::Int);
        let bits = flat_src.narrow(0, start, len).view_dtype(Kind::Int);
        let rounded = (bits + noise)
            .bitwise_and(-65536i64)
            .view_dtype(Kind::Float)
            .to_kind(Kind::BFloat16);
        flat_dst
            .narrow(0, start, len)
            .copy_(&rounded.to_kind(flat_dst.kind()));
        start += len;
    }
    if flat_dst.data_ptr() != dst.data_ptr() {
        // `dst` was not contiguous: `reshape` copied it, so write the copy back.
        dst.copy_(&flat_dst.reshape(dst.size()));
    }
}

/// `torch.optim.AdamW`'s update of one parameter.
#[allow(clippy::too_many_arguments)]
fn adamw_step(
    cfg: &AdamWConfig,
    step: i64,
    lr: f64,
    param: &mut Tensor,
    grad: &Tensor,
    exp_avg: &mut Tensor,
    exp_avg_sq: &mut Tensor,
    decay: bool,
) {
    let AdamWConfig {
        beta1,
        beta2,
        eps,
        weight_decay,
    } = *cfg;
    let bias1 = 1.0 - beta1.powi(step as i32);
    let bias2_sqrt = (1.0 - beta2.powi(step as i32)).sqrt();
    let step_size = lr / bias1;
    if decay && weight_decay != 0.0 {
        let _ = param.g_mul_scalar_(1.0 - lr * weight_decay);
    }
    let _ = exp_avg.lerp_(grad, 1.0 - beta1);
    let _ = exp_avg_sq.lerp_(&grad.square(), 1.0 - beta2);
    if step_size == 0.0 {
        return; // lr 0: moments advance, parameters stay (as in PyTorch)
    }
    // param -= step_size · m / (√v / √bias2 + eps), with one temporary: the step size is
    // folded into the denominator because tch's addcdiv_ has no `value`.
    let mut denom = exp_avg_sq.sqrt();
    let _ = denom.g_div_scalar_(bias2_sqrt);
    let _ = denom.g_add_scalar_(eps);
    let _ = denom.g_div_scalar_(-step_size);
    let _ = param.addcdiv_(exp_avg, &denom);
}

/// `torch.optim.Muon`'s update of one matrix.
fn muon_step(
    cfg: &MuonConfig,
    lr: f64,
    param: &mut Tensor,
    grad: &Tensor,
    buf: &mut Tensor,
    fans: (i64, i64),
) {
    let _ = buf.lerp_(grad, 1.0 - cfg.momentum);
    let update = if cfg.nesterov {
        grad.lerp(&*buf, cfg.momentum)
    } else {
        buf.shallow_clone()
    };
    let kind = ns_kind(cfg.ns_precision, param.device());
    let update = zeropower_newton_schulz(&update, cfg.ns_steps, kind);
    let adjusted = muon_lr(lr, cfg.adjust_lr_fn, fans);
    let _ = param.g_mul_scalar_(1.0 - lr * cfg.weight_decay);
    let _ = param.g_add_(&(update.to_kind(param.kind()) * -adjusted));
}

/// `torch.optim.Adafactor`'s update of one parameter.
#[allow(clippy::too_many_arguments)]
fn adafactor_step(
    cfg: &AdafactorConfig,
    step: i64,
    lr: f64,
    param: &mut Tensor,
    grad: &Tensor,
    row_var: Option<&mut Tensor>,
    col_var: Option<&mut Tensor>,
    variance: Option<&mut Tensor>,
) {
    let t = step as f64;
    let eps1 = cfg.eps1.unwrap_or(match param.kind() {
        Kind::Double => f64::EPSILON,
        Kind::BFloat16 => 0.0078125,
        Kind::Half => 0.0009765625,
        _ => f32::EPSILON as f64,
    });
    let one_minus_beta2 = t.powf(cfg.beta2_decay);
    let rho = lr.min(1.0 / t.sqrt());
    let rms = f64::try_from(param.norm()).unwrap_or(f64::NAN) / (param.numel() as f64).sqrt();
    let alpha = cfg.eps2.max(rms) * rho;
    if cfg.weight_decay != 0.0 {
        let _ = param.g_mul_scalar_(1.0 - lr * cfg.weight_decay);
    }
    let mut estimate = match (row_var, col_var, variance) {
        (Some(row_var), Some(col_var), _) => {
            let dims = grad.dim() as i64;
            let squares =
                |dim: i64, len: i64| grad.norm_scalaropt_dim(2, [dim], true).square() / len as f64;
            let size = grad.size();
            let _ = row_var.lerp_(&squares(dims - 1, size[size.len() - 1]), one_minus_beta2);
            let _ = col_var.lerp_(&squares(dims - 2, size[size.len() - 2]), one_minus_beta2);
            let estimate = row_var.matmul(col_var);
            let row_mean = row_var
                .mean_dim(&[dims - 2][..], true, row_var.kind())
                .clamp_min(eps1);
            estimate / row_mean
        }
        (_, _, Some(variance)) => {
            let _ = variance.lerp_(&grad.square(), one_minus_beta2);
            variance.copy()
        }
        _ => unreachable!("an Adafactor state is factored or full"),
    };
    let _ = estimate.clamp_min_(eps1 * eps1);
    let mut update = estimate.rsqrt_();
    let _ = update.g_mul_(grad);
    let update_rms =
        f64::try_from(update.norm()).unwrap_or(f64::NAN) / ((update.numel() as f64).sqrt() * cfg.d);
    let denom = update_rms.max(1.0);
    let _ = param.g_add_(&(update * (-alpha / denom)));
}

/// Adds `more` into `acc` element by element (gradient accumulation over micro-batches).
pub fn accumulate(acc: &mut [Tensor], more: Vec<Tensor>) {
    assert_eq!(acc.len(), more.len(), "gradient lists of the same model");
    tch::no_grad(|| {
        for (a, m) in acc.iter_mut().zip(more) {
            if !a.defined() {
                *a = m;
            } else if m.defined() {
                let _ = a.g_add_(&m);
            }
        }
    });
}

/// Scales `grads` in place so their global L2 norm is at most `max_norm`; returns the norm
/// before clipping. `max_norm <= 0` only measures.
pub fn clip_grad_norm(grads: &[Tensor], max_norm: f64) -> f64 {
    let defined: Vec<&Tensor> = grads.iter().filter(|g| g.defined()).collect();
    if defined.is_empty() {
        return 0.0;
    }
    let total = tch::no_grad(|| {
        let norms: Vec<Tensor> = defined.iter().map(|g| g.norm()).collect();
        f64::try_from(Tensor::stack(&norms, 0).norm()).unwrap_or(f64::NAN)
    });
    clip_to_norm(grads, max_norm, total);
    total
}

/// Scales `grads` in place by `max_norm / total` when `total`, their global L2 norm (which a
/// pipeline stage learns from every stage), is above `max_norm > 0`.
pub fn clip_to_norm(grads: &[Tensor], max_norm: f64, total: f64) {
    if max_norm > 0.0 && total.is_finite() {
        let coef = max_norm / (total + 1e-6);
        if coef < 1.0 {
            tch::no_grad(|| {
                for g in grads.iter().filter(|g| g.defined()) {
                    let _ = g.shallow_clone().g_mul_scalar_(coef);
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, nn};

    /// Stochastic rounding keeps what bf16 holds, picks only the two neighbours of what it
    /// does not, with the probabilities that make it unbiased, for either sign; the same key
    /// gives the same rounding, another key another.
    #[test]
    fn stochastic_rounding_is_unbiased_and_deterministic() {
        let n = 1 << 21; // two chunks
        let round = |value: f32, key: i64| {
            let src = Tensor::full([n], value as f64, (Kind::Float, Device::Cpu));
            let mut dst = Tensor::zeros([n], (Kind::BFloat16, Device::Cpu));
            stochastic_round_into(&mut dst, &src, key);
            dst.to_kind(Kind::Float)
        };
        for exact in [1.0f32, -0.5, 0.0, 3.140625] {
            let got = round(exact, 7);
            assert_eq!(f64::try_from(got.max()).unwrap(), exact as f64);
            assert_eq!(f64::try_from(got.min()).unwrap(), exact as f64);
        }
        // Between 1 and the next bf16 (1 + 2^-7), a quarter of the way: up with p = 1/4.
        for sign in [1.0f32, -1.0] {
            let value = sign * (1.0 + 0.25 / 128.0);
            let got = round(value, 7);
            let up = f64::try_from(got.eq(sign as f64 * (1.0 + 1.0 / 128.0)).sum(Kind::Float))
                .unwrap()
                / n as f64;
            let down = f64::try_from(got.eq(sign as f64).sum(Kind::Float)).unwrap() / n as f64;
            assert!(
                (up - 0.25).abs() < 0.002 && (up + down - 1.0).abs() < 1e-12,
                "{up} {down}"
            );
            let mean = f64::try_from(got.mean(Kind::Double)).unwrap();
            assert!((mean - value as f64).abs() < 2e-5, "mean {mean} of {value}");
        }
        let value = 1.0 + 0.5 / 128.0;
        assert!(round(value, 7).equal(&round(value, 7)));
        assert!(!round(value, 7).equal(&round(value, 8)));
        // A transposed (non-contiguous) destination is written through.
        let src = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).reshape([2, 3]);
        let mut dst = Tensor::zeros([3, 2], (Kind::BFloat16, Device::Cpu)).tr();
        stochastic_round_into(&mut dst, &src, 1);
        assert!(dst.to_kind(Kind::Float).equal(&src));
    }

    /// In bf16-pure, an update far below bf16's spacing still moves a parameter in expectation
    /// (round to nearest would leave it where it is), and a parameter's state stays bf16.
    #[test]
    fn bf16_parameters_take_updates_smaller_than_their_spacing_in_expectation() {
        let mut vs = VarStore::new(Device::Cpu);
        let w = vs.root().var("w", &[1 << 16], nn::Init::Const(1.0));
        vs.bfloat16();
        let mut opt = Optimizer::adamw(
            &vs,
            AdamWConfig {
                weight_decay: 0.0,
                ..AdamWConfig::default()
            },
        );
        let grad = Tensor::ones([1 << 16], (Kind::BFloat16, Device::Cpu));
        // AdamW's first step moves by lr · sign(grad): 1e-4, a 78th of bf16's spacing at 1.
        opt.step(1e-4, &[grad]);
        assert_eq!(w.kind(), Kind::BFloat16);
        let mean = f64::try_from(w.to_kind(Kind::Float).mean(Kind::Double)).unwrap();
        assert!((mean - (1.0 - 1e-4)).abs() < 1e-5, "mean {mean}");
        let state = opt.state_tensors();
        assert!(
            state
                .iter()
                .filter(|(n, _)| n != "step")
                .all(|(_, t)| t.kind() == Kind::BFloat16)
        );
    }

    /// One AdamW step on f(w) = sum(w * c) matches the closed form (first step moves every
    /// coordinate by lr·sign(grad), plus decay).
    #[test]
    fn first_step_matches_closed_form() {
        let vs = VarStore::new(Device::Cpu);
        let w = vs.root().var("w", &[2, 3], nn::Init::Const(1.0));
        let b = vs.root().var("b", &[3], nn::Init::Const(1.0));
        let c = Tensor::from_slice(&[1.0f32, -2.0, 3.0]);
        let loss = (&w * &c).sum(Kind::Float) + (&b * &c).sum(Kind::Float);
        let mut opt = Optimizer::adamw(&vs, AdamWConfig::default());
        let grads = opt.gradients(&loss);
        let lr = 0.01;
        opt.step(lr, &grads);
        // w decays (matrix), b does not (vector).
        let w_expected =
            Tensor::from_slice(&[1.0f32 * (1.0 - 0.001) - 0.01, 0.999 + 0.01, 0.999 - 0.01]);
        let b_expected = Tensor::from_slice(&[0.99f32, 1.01, 0.99]);
        let dw = f64::try_from((w.get(0) - w_expected).abs().max()).unwrap();
        let db = f64::try_from((b - b_expected).abs().max()).unwrap();
        assert!(dw < 1e-6 && db < 1e-6, "dw {dw} db {db}");
        assert_eq!(opt.step_count(), 1);
    }

    /// Newton–Schulz in fp32 (`ns_precision = "auto"` on a CPU) is the bf16 iteration with less
    /// rounding: both take a wide and a tall matrix to the same near-orthogonal update (singular
    /// values in the quintic's band around 1), and agree to bf16's precision. `"auto"` picks
    /// fp32 off CUDA, bf16 on it.
    #[test]
    fn newton_schulz_in_fp32_matches_bf16_to_bf16_precision() {
        tch::manual_seed(7);
        assert_eq!(ns_kind(NsPrecision::Auto, Device::Cpu), Kind::Float);
        assert_eq!(ns_kind(NsPrecision::Auto, Device::Cuda(0)), Kind::BFloat16);
        assert_eq!(ns_kind(NsPrecision::Bf16, Device::Cpu), Kind::BFloat16);
        assert_eq!(ns_kind(NsPrecision::Fp32, Device::Cuda(0)), Kind::Float);
        for shape in [[24i64, 64], [64, 24]] {
            let grad = Tensor::randn(shape, (Kind::Float, Device::Cpu));
            let fp32 = zeropower_newton_schulz(&grad, 5, Kind::Float);
            let bf16 = zeropower_newton_schulz(&grad, 5, Kind::BFloat16).to_kind(Kind::Float);
            assert_eq!(fp32.kind(), Kind::Float);
            let max_abs = |t: &Tensor| f64::try_from(t.abs().max()).unwrap();
            let apart = max_abs(&(&fp32 - &bf16)) / max_abs(&fp32);
            assert!(apart < 0.05, "{shape:?}: fp32 and bf16 differ by {apart}");
            // The singular values: square roots of the eigenvalues of the smaller Gram matrix.
            let gram = if shape[0] < shape[1] {
                fp32.matmul(&fp32.tr())
            } else {
                fp32.tr().matmul(&fp32)
            };
            let squares = gram.linalg_eigvalsh("L");
            let (low, high) = (
                f64::try_from(squares.min()).unwrap().sqrt(),
                f64::try_from(squares.max()).unwrap().sqrt(),
            );
            assert!(
                low > 0.5 && high < 1.3,
                "{shape:?}: singular values {low}..{high}"
            );
        }
    }

    /// Muon takes the hidden weight matrices (a GPT-2 Conv1D's fans read transposed); the
    /// embeddings, the head and every vector stay with AdamW. Adafactor factors matrices only.
    #[test]
    fn each_optimizer_gives_each_parameter_its_rule() {
        let vs = VarStore::new(Device::Cpu);
        let root = vs.root();
        let zeros = |p: nn::Path<'_>, shape: &[i64]| {
            let _ = p.var("weight", shape, nn::Init::Const(0.0));
        };
        zeros(&root / "transformer" / "wte", &[50, 8]);
        zeros(&root / "transformer" / "h" / "0" / "mlp" / "c_fc", &[8, 32]);
        zeros(
            &root / "model" / "layers" / "0" / "mlp" / "up_proj",
            &[32, 8],
        );
        zeros(&root / "model" / "norm", &[8]);
        zeros(&root / "lm_head", &[50, 8]);
        let kinds = |kind| {
            let cfg = OptimizerConfig {
                kind,
                ..OptimizerConfig::default()
            };
            let opt = Optimizer::new(&vs, &cfg, AdamWConfig::default());
            opt.params
                .iter()
                .map(|p| match &p.rule {
                    Rule::AdamW { .. } => "adamw".to_string(),
                    Rule::Muon { fans, .. } => format!("muon {}x{}", fans.0, fans.1),
                    Rule::Adafactor { variance, .. } => if variance.is_some() {
                        "full"
                    } else {
                        "factored"
                    }
                    .to_string(),
                })
                .collect::<Vec<_>>()
        };
        // Name order: lm_head, model.layers.0.mlp.up_proj, model.norm, transformer.h.0.mlp.c_fc,
        // transformer.wte.
        assert_eq!(
            kinds(OptimizerKind::Muon),
            ["adamw", "muon 32x8", "adamw", "muon 32x8", "adamw"]
        );
        assert_eq!(
            kinds(OptimizerKind::Adafactor),
            ["factored", "factored", "full", "factored", "factored"]
        );
        assert_eq!(muon_lr(0.01, MuonLrAdjust::Original, (32, 8)), 0.02);
        assert_eq!(muon_lr(0.01, MuonLrAdjust::Original, (8, 32)), 0.01);
        assert!(
            (muon_lr(0.01, MuonLrAdjust::MatchRmsAdamw, (8, 32)) - 0.002 * 32f64.sqrt()).abs()
                < 1e-15
        );
    }

    #[test]
    fn state_round_trips_exactly() {
        let vs = VarStore::new(Device::Cpu);
        let w = vs.root().var(
            "w",
            &[3, 2],
            nn::Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        );
        let mut opt = Optimizer::adamw(&vs, AdamWConfig::default());
        for _ in 0..3 {
            let grads = opt.gradients(&(&w * &w).sum(Kind::Float));
            opt.step(0.01, &grads);
        }
        let saved: HashMap<String, Tensor> = opt
            .state_tensors()
            .into_iter()
            .map(|(k, t)| (k, t.copy()))
            .collect();
        let mut fresh = Optimizer::adamw(&vs, AdamWConfig::default());
        fresh.load_state_tensors(&saved).unwrap();
        assert_eq!(fresh.step_count(), 3);
        for ((ka, a), (kb, b)) in opt.state_tensors().iter().zip(fresh.state_tensors().iter()) {
            assert_eq!(ka, kb);
            assert!(a.equal(b), "{ka}");
        }
        let mut partial = saved;
        partial.remove("w.exp_avg_sq");
        let err = fresh.load_state_tensors(&partial).unwrap_err().to_string();
        assert!(err.contains("w.exp_avg_sq"), "{err}");
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let vs = VarStore::new(Device::Cpu);
        let w = vs.root().var("w", &[4], nn::Init::Const(0.0));
        let opt = Optimizer::adamw(&vs, AdamWConfig::default());
        let grads =
            opt.gradients(&(&w * Tensor::from_slice(&[3.0f32, 4.0, 0.0, 0.0])).sum(Kind::Float));
        let before = clip_grad_norm(&grads, 1.0);
        assert!((before - 5.0).abs() < 1e-5);
        let after = clip_grad_norm(&grads, 0.0);
        assert!((after - 1.0).abs() < 1e-4, "{after}");
    }

    /// Explicit gradients equal what `.backward()` accumulates, and accumulating two halves
    /// equals the gradient of the sum.
    #[test]
    fn explicit_gradients_match_backward_and_accumulate() {
        let vs = VarStore::new(Device::Cpu);
        let w = vs.root().var(
            "w",
            &[3],
            nn::Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        );
        let unused = vs.root().var("unused", &[2], nn::Init::Const(1.0));
        let opt = Optimizer::adamw(&vs, AdamWConfig::default());
        let f = |k: f64| (&w * &w * k).sum(Kind::Float);
        let mut acc = opt.gradients(&f(1.0));
        accumulate(&mut acc, opt.gradients(&f(2.0)));
        f(3.0).backward();
        // Order is by name: unused, w.
        assert!(!acc[0].defined(), "an unused parameter has no gradient");
        assert!(acc[1].allclose(&w.grad(), 1e-6, 1e-6, false));
        assert!(!unused.grad().defined());
    }
}
