//! Inner optimizer: AdamW with decoupled weight decay on matrices only, and global-norm
//! gradient clipping. The state (moments and step) is explicit so checkpoints can save it.
//!
//! Gradients are explicit too: [`AdamW::gradients`] returns fresh tensors (autograd.grad)
//! instead of accumulating into each parameter's `.grad`, which saves a zeroing pass and an
//! accumulation pass per step (tch cannot reset `.grad` to None) and gives data-parallel
//! reducers one ordered list to average.

use crate::error::{Error, Result};
use crate::models::trainable_by_name;
use std::collections::HashMap;
use std::path::PathBuf;
use tch::{Tensor, nn::VarStore};

pub use forge_protocol::run_config::AdamWConfig;

#[derive(Debug)]
struct ParamState {
    name: String,
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    decay: bool,
}

/// AdamW over every trainable variable of a `VarStore`, in name order.
#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    params: Vec<ParamState>,
    step: i64,
}

impl AdamW {
    /// Matrices (2-D and up: linear weights and embeddings) get weight decay; vectors (norm
    /// gains, biases) do not.
    pub fn new(vs: &VarStore, cfg: AdamWConfig) -> Self {
        let params = trainable_by_name(vs)
            .into_iter()
            .map(|(name, param)| ParamState {
                decay: param.dim() >= 2,
                exp_avg: param.zeros_like(),
                exp_avg_sq: param.zeros_like(),
                name,
                param,
            })
            .collect();
        AdamW {
            cfg,
            params,
            step: 0,
        }
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

    /// One AdamW step at learning rate `lr` with `grads` from [`AdamW::gradients`]. Parameters
    /// whose gradient is undefined are left untouched.
    pub fn step(&mut self, lr: f64, grads: &[Tensor]) {
        assert_eq!(grads.len(), self.params.len(), "one gradient per parameter");
        self.step += 1;
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.cfg;
        let bias1 = 1.0 - beta1.powi(self.step as i32);
        let bias2_sqrt = (1.0 - beta2.powi(self.step as i32)).sqrt();
        let step_size = lr / bias1;
        tch::no_grad(|| {
            for (s, grad) in self.params.iter_mut().zip(grads) {
                if !grad.defined() {
                    continue;
                }
                if s.decay && weight_decay != 0.0 {
                    let _ = s.param.g_mul_scalar_(1.0 - lr * weight_decay);
                }
                let _ = s.exp_avg.lerp_(grad, 1.0 - beta1);
                let _ = s.exp_avg_sq.lerp_(&grad.square(), 1.0 - beta2);
                if step_size == 0.0 {
                    continue; // lr 0: moments advance, parameters stay (as in PyTorch)
                }
                // param -= step_size · m / (√v / √bias2 + eps), with one temporary: the step
                // size is folded into the denominator because tch's addcdiv_ has no `value`.
                let mut denom = s.exp_avg_sq.sqrt();
                let _ = denom.g_div_scalar_(bias2_sqrt);
                let _ = denom.g_add_scalar_(eps);
                let _ = denom.g_div_scalar_(-step_size);
                let _ = s.param.addcdiv_(&s.exp_avg, &denom);
            }
        });
    }

    /// The optimizer state as named tensors (`<param>.exp_avg`, `<param>.exp_avg_sq`, and
    /// `step`), for checkpoints.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = self
            .params
            .iter()
            .flat_map(|s| {
                [
                    (format!("{}.exp_avg", s.name), s.exp_avg.shallow_clone()),
                    (
                        format!("{}.exp_avg_sq", s.name),
                        s.exp_avg_sq.shallow_clone(),
                    ),
                ]
            })
            .collect();
        out.push(("step".into(), Tensor::from_slice(&[self.step])));
        out
    }

    /// Restores state written by [`AdamW::state_tensors`]; every moment must be present with
    /// its parameter's shape.
    pub fn load_state_tensors(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let missing = |name: &str| Error::Checkpoint {
            path: PathBuf::from("optimizer.safetensors"),
            why: format!("optimizer state has no tensor {name} of the right shape"),
        };
        let step = tensors.get("step").ok_or_else(|| missing("step"))?;
        let step = i64::try_from(step.reshape([-1]).get(0)).map_err(|_| missing("step"))?;
        let get = |name: String, like: &Tensor| -> Result<Tensor> {
            match tensors.get(&name) {
                Some(t) if t.size() == like.size() => Ok(t.shallow_clone()),
                _ => Err(missing(&name)),
            }
        };
        let mut loaded = Vec::with_capacity(self.params.len());
        for s in &self.params {
            loaded.push((
                get(format!("{}.exp_avg", s.name), &s.exp_avg)?,
                get(format!("{}.exp_avg_sq", s.name), &s.exp_avg_sq)?,
            ));
        }
        tch::no_grad(|| {
            for (s, (m, v)) in self.params.iter_mut().zip(loaded) {
                s.exp_avg
                    .copy_(&m.to_kind(s.exp_avg.kind()).to_device(s.exp_avg.device()));
                s.exp_avg_sq.copy_(
                    &v.to_kind(s.exp_avg_sq.kind())
                        .to_device(s.exp_avg_sq.device()),
                );
            }
        });
        self.step = step;
        Ok(())
    }
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
    use tch::{Device, Kind, nn};

    /// One AdamW step on f(w) = sum(w * c) matches the closed form (first step moves every
    /// coordinate by lr·sign(grad), plus decay).
    #[test]
    fn first_step_matches_closed_form() {
        let vs = VarStore::new(Device::Cpu);
        let w = vs.root().var("w", &[2, 3], nn::Init::Const(1.0));
        let b = vs.root().var("b", &[3], nn::Init::Const(1.0));
        let c = Tensor::from_slice(&[1.0f32, -2.0, 3.0]);
        let loss = (&w * &c).sum(Kind::Float) + (&b * &c).sum(Kind::Float);
        let mut opt = AdamW::new(&vs, AdamWConfig::default());
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
        let mut opt = AdamW::new(&vs, AdamWConfig::default());
        for _ in 0..3 {
            let grads = opt.gradients(&(&w * &w).sum(Kind::Float));
            opt.step(0.01, &grads);
        }
        let saved: HashMap<String, Tensor> = opt
            .state_tensors()
            .into_iter()
            .map(|(k, t)| (k, t.copy()))
            .collect();
        let mut fresh = AdamW::new(&vs, AdamWConfig::default());
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
        let opt = AdamW::new(&vs, AdamWConfig::default());
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
        let opt = AdamW::new(&vs, AdamWConfig::default());
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
