//! DiLoCo outer optimizer: the global parameters and their Nesterov momentum in fp32 on the
//! CPU, the pseudo-gradient `theta_global - theta_local`, and hashes that let every replica
//! prove it holds the same global state.
//!
//! An outer step is two-phase: [`OuterOptimizer::propose`] computes the new global state from
//! the averaged pseudo-gradient without touching anything, the node reports the proposal's
//! hash, and only when the coordinator commits the round does [`OuterOptimizer::commit`] make
//! it the global state and copy it into the model. An abandoned round drops the proposal; the
//! local parameters keep their progress, which the next round's pseudo-gradient then carries.

use crate::error::{Error, Result};
use crate::models::trainable_by_name;
use forge_protocol::digest;
use forge_protocol::messages::TensorKey;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use tch::{Device, Kind, Tensor, nn::VarStore};

use forge_protocol::quant::squares;
/// `[diloco]` in a run config; defined with the run config schema in forge-protocol.
pub use forge_protocol::run_config::{DilocoConfig, OverlapSteps};
use forge_protocol::run_config::{OuterLrScaling, Spread};

/// SHA-256 of a tensor's fp32 little-endian bytes ([`digest::tensor_digest`]).
pub type TensorDigest = [u8; 32];

/// A computed but not yet committed outer step.
#[derive(Debug)]
pub struct Proposal {
    global: Vec<Tensor>,
    momentum: Vec<Tensor>,
    /// Hash of the proposed global parameters (over the per-tensor digests, in name order).
    pub params_hash: TensorDigest,
    /// The outer lr this step took ([`DilocoConfig::outer_lr_for`] what the round averaged).
    pub outer_lr: f64,
    /// Digests of every global parameter, then of its outer momentum: what the coordinator
    /// commits and a joiner checks fetched state against.
    pub tensor_hashes: Vec<(TensorKey, TensorDigest)>,
}

/// The global state one replica holds.
#[derive(Debug)]
pub struct OuterOptimizer {
    cfg: DilocoConfig,
    names: Vec<String>,
    global: Vec<Tensor>,
    momentum: Vec<Tensor>,
    numel: usize,
}

/// A CPU fp32 view of `t`: shares storage when `t` already is one (read-only uses).
fn cpu_f32(t: &Tensor) -> Tensor {
    t.detach()
        .to_device(Device::Cpu)
        .to_kind(Kind::Float)
        .contiguous()
}

/// A CPU fp32 copy of `t` that never shares storage with it (the global state must not move
/// when the model trains).
fn owned_f32(t: &Tensor) -> Tensor {
    cpu_f32(t).copy()
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.reshape([-1])).expect("fp32 CPU tensor")
}

/// [`digest::tensor_digest`] of a tensor's values as fp32.
pub(crate) fn tensor_digest(t: &Tensor) -> TensorDigest {
    digest::tensor_digest(&to_vec(&cpu_f32(t)))
}

/// Each tensor's digest under its key, and the hash over those digests in that order (the
/// `params_hash` when the tensors are the global parameters in name order).
fn hashes(
    keys: impl Iterator<Item = TensorKey>,
    tensors: &[Tensor],
) -> (TensorDigest, Vec<(TensorKey, TensorDigest)>) {
    let per: Vec<(TensorKey, TensorDigest)> = keys
        .zip(tensors)
        .map(|(key, t)| (key, tensor_digest(t)))
        .collect();
    let mut all = Sha256::new();
    for (_, d) in &per {
        all.update(d);
    }
    (all.finalize().into(), per)
}

impl OuterOptimizer {
    /// Starts from the model's current parameters as the global state, momentum zero.
    pub fn new(vs: &VarStore, cfg: DilocoConfig) -> Result<Self> {
        OuterOptimizer::without(vs, cfg, None)
    }

    /// [`OuterOptimizer::new`] over every trainable parameter but `derived`: one whose value
    /// another node's state holds (the last pipeline stage's copy of a tied embedding, which
    /// the first stage's global state sets).
    pub fn without(vs: &VarStore, cfg: DilocoConfig, derived: Option<&str>) -> Result<Self> {
        cfg.validate()?;
        let named: Vec<(String, Tensor)> = trainable_by_name(vs)
            .into_iter()
            .filter(|(name, _)| Some(name.as_str()) != derived)
            .collect();
        let global: Vec<Tensor> = named.iter().map(|(_, t)| owned_f32(t)).collect();
        let momentum = global.iter().map(Tensor::zeros_like).collect();
        let numel = global.iter().map(|t| t.numel()).sum();
        Ok(OuterOptimizer {
            cfg,
            names: named.into_iter().map(|(n, _)| n).collect(),
            global,
            momentum,
            numel,
        })
    }

    /// Elements in a flattened pseudo-gradient.
    pub fn numel(&self) -> usize {
        self.numel
    }

    /// `theta_global - theta_local`, flattened in name order, fp32.
    pub fn pseudo_gradient(&self, vs: &VarStore) -> Vec<f32> {
        let named = self.params(vs);
        let mut out = Vec::with_capacity(self.numel);
        tch::no_grad(|| {
            for (local, global) in named.iter().zip(&self.global) {
                out.extend(to_vec(&(global - cpu_f32(local))));
            }
        });
        out
    }

    /// The outer step for the pseudo-gradient averaged over `members` replicas whose norm (root
    /// mean square, weighted as the average is) was `member_norm` (0: not measured), not yet
    /// applied. The outer lr follows [`DilocoConfig::outer_lr_for`].
    pub fn propose(&self, average: &[f32], members: usize, member_norm: f64) -> Result<Proposal> {
        if average.len() != self.numel {
            return Err(Error::InvalidTrainConfig(format!(
                "averaged pseudo-gradient has {} values, the model {}",
                average.len(),
                self.numel
            )));
        }
        let DilocoConfig {
            outer_momentum,
            nesterov,
            ..
        } = self.cfg;
        let average_norm = match self.cfg.outer_lr_scaling {
            OuterLrScaling::NormRatio => squares(average).sqrt(),
            OuterLrScaling::None | OuterLrScaling::SqrtMembers => 0.0,
        };
        let outer_lr = self.cfg.outer_lr_for(Spread {
            members,
            member_norm,
            average_norm,
        });
        let mut offset = 0;
        let mut global = Vec::with_capacity(self.global.len());
        let mut momentum = Vec::with_capacity(self.global.len());
        tch::no_grad(|| {
            for (g, m) in self.global.iter().zip(&self.momentum) {
                let n = g.numel();
                let delta =
                    Tensor::from_slice(&average[offset..offset + n]).view(g.size().as_slice());
                offset += n;
                // SGD with momentum as torch.optim.SGD: buf = mu·buf + d; step = d + mu·buf.
                let buf = m * outer_momentum + &delta;
                let step = if nesterov {
                    &delta + &buf * outer_momentum
                } else {
                    buf.shallow_clone()
                };
                global.push(g - step * outer_lr);
                momentum.push(buf);
            }
        });
        let (params_hash, mut tensor_hashes) = hashes(self.param_keys(), &global);
        tensor_hashes.extend(hashes(self.momentum_keys(), &momentum).1);
        Ok(Proposal {
            global,
            momentum,
            params_hash,
            outer_lr,
            tensor_hashes,
        })
    }

    /// Makes `proposal` the global state and copies it into the model's parameters.
    pub fn commit(&mut self, proposal: Proposal, vs: &VarStore) {
        self.global = proposal.global;
        self.momentum = proposal.momentum;
        self.load_into(vs);
    }

    /// Adds `delta` (flattened in name order, as [`OuterOptimizer::pseudo_gradient`]) to the
    /// model's parameters: inner steps taken while an outer step was on its way, put on top of
    /// it. The difference of two pseudo-gradients against one global state is the progress
    /// between them, negated.
    pub fn add_to_params(&self, vs: &VarStore, delta: &[f32]) -> Result<()> {
        if delta.len() != self.numel {
            return Err(Error::InvalidTrainConfig(format!(
                "a parameter update has {} values, the model {}",
                delta.len(),
                self.numel
            )));
        }
        let mut offset = 0;
        tch::no_grad(|| {
            for mut local in self.params(vs) {
                let n = local.numel();
                let d = Tensor::from_slice(&delta[offset..offset + n])
                    .view(local.size().as_slice())
                    .to_device(local.device());
                offset += n;
                // In fp32 and rounded once, whatever the model's kind.
                let sum = cpu_f32(&local).to_device(local.device()) + d;
                local.copy_(&sum.to_kind(local.kind()));
            }
        });
        Ok(())
    }

    /// Copies the global parameters into the model (after a commit, or to undo local steps).
    pub fn load_into(&self, vs: &VarStore) {
        tch::no_grad(|| {
            for (mut local, global) in self.params(vs).into_iter().zip(&self.global) {
                local.copy_(&global.to_device(local.device()).to_kind(local.kind()));
            }
        });
    }

    /// Hash of the current global parameters and per-tensor digests.
    pub fn global_hash(&self) -> (TensorDigest, Vec<(TensorKey, TensorDigest)>) {
        hashes(self.param_keys(), &self.global)
    }

    /// Digests of every global parameter, then of its outer momentum, as a [`Proposal`] lists
    /// them: what a version's committed hashes are compared with.
    pub fn state_hashes(&self) -> Vec<(TensorKey, TensorDigest)> {
        let mut all = hashes(self.param_keys(), &self.global).1;
        all.extend(hashes(self.momentum_keys(), &self.momentum).1);
        all
    }

    /// The model's parameters this state covers, in its order.
    fn params(&self, vs: &VarStore) -> Vec<Tensor> {
        trainable_by_name(vs)
            .into_iter()
            .filter(|(name, _)| self.names.contains(name))
            .map(|(_, t)| t)
            .collect()
    }

    fn param_keys(&self) -> impl Iterator<Item = TensorKey> + '_ {
        self.names.iter().cloned().map(TensorKey::Param)
    }

    fn momentum_keys(&self) -> impl Iterator<Item = TensorKey> + '_ {
        self.names.iter().cloned().map(TensorKey::Momentum)
    }

    /// Global parameters and momentum by key (each parameter, then its momentum), for
    /// checkpoints and state transfer.
    pub fn state_tensors(&self) -> Vec<(TensorKey, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.names.len());
        for ((n, g), m) in self.names.iter().zip(&self.global).zip(&self.momentum) {
            out.push((TensorKey::Param(n.clone()), g.shallow_clone()));
            out.push((TensorKey::Momentum(n.clone()), m.shallow_clone()));
        }
        out
    }

    /// Keys and shapes of [`OuterOptimizer::state_tensors`], in that order.
    pub fn state_shapes(&self) -> Vec<(TensorKey, Vec<i64>)> {
        let mut out = Vec::with_capacity(2 * self.names.len());
        for (n, g) in self.names.iter().zip(&self.global) {
            out.push((TensorKey::Param(n.clone()), g.size()));
            out.push((TensorKey::Momentum(n.clone()), g.size()));
        }
        out
    }

    /// Restores state written by [`OuterOptimizer::state_tensors`].
    pub fn load_state_tensors(&mut self, tensors: &HashMap<TensorKey, Tensor>) -> Result<()> {
        let mut global = Vec::with_capacity(self.names.len());
        let mut momentum = Vec::with_capacity(self.names.len());
        for (n, like) in self.names.iter().zip(&self.global) {
            let keys = [
                (TensorKey::Param(n.clone()), &mut global),
                (TensorKey::Momentum(n.clone()), &mut momentum),
            ];
            for (key, out) in keys {
                match tensors.get(&key) {
                    Some(t) if t.size() == like.size() => out.push(owned_f32(t)),
                    _ => {
                        return Err(Error::Checkpoint {
                            path: "outer state".into(),
                            why: format!("no tensor {key} of shape {:?}", like.size()),
                        });
                    }
                }
            }
        }
        self.global = global;
        self.momentum = momentum;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn;

    fn store(values: &[f32]) -> (VarStore, Tensor) {
        let vs = VarStore::new(Device::Cpu);
        let w = vs
            .root()
            .var("w", &[values.len() as i64], nn::Init::Const(0.0));
        tch::no_grad(|| w.shallow_clone().copy_(&Tensor::from_slice(values)));
        (vs, w)
    }

    #[test]
    fn sync_warmup_rounds_are_one_step_long() {
        let cfg = DilocoConfig {
            inner_steps: 10,
            sync_warmup_steps: 3,
            ..DilocoConfig::default()
        };
        let steps: Vec<u64> = (0..5).map(|s| cfg.round_steps(s)).collect();
        assert_eq!(steps, vec![1, 1, 1, 10, 10]);
        assert_eq!(DilocoConfig::default().round_steps(0), 30);
    }

    #[test]
    fn pseudo_gradient_and_nesterov_step_match_torch_sgd() {
        let (vs, w) = store(&[1.0, 2.0]);
        let cfg = DilocoConfig {
            outer_lr: 0.5,
            outer_momentum: 0.9,
            nesterov: true,
            ..DilocoConfig::default()
        };
        let mut outer = OuterOptimizer::new(&vs, cfg).unwrap();
        // Local training moved w to [0.8, 2.4]: delta = global - local = [0.2, -0.4].
        tch::no_grad(|| w.shallow_clone().copy_(&Tensor::from_slice(&[0.8f32, 2.4])));
        let delta = outer.pseudo_gradient(&vs);
        assert!(
            (delta[0] - 0.2).abs() < 1e-6 && (delta[1] + 0.4).abs() < 1e-6,
            "{delta:?}"
        );
        // Step 1: buf = d; step = d + 0.9 d = 1.9 d; global = [1, 2] - 0.5 * 1.9 * d.
        let p = outer.propose(&delta, 1, 0.0).unwrap();
        outer.commit(p, &vs);
        let got = Vec::<f32>::try_from(&w).unwrap();
        assert!((got[0] - (1.0 - 0.5 * 1.9 * 0.2)).abs() < 1e-6, "{got:?}");
        assert!((got[1] - (2.0 + 0.5 * 1.9 * 0.4)).abs() < 1e-6, "{got:?}");
        // Step 2 with the same delta: buf = 0.9 d + d = 1.9 d; step = d + 0.9·1.9 d = 2.71 d.
        let before = Vec::<f32>::try_from(&w).unwrap();
        let p = outer.propose(&delta, 1, 0.0).unwrap();
        outer.commit(p, &vs);
        let after = Vec::<f32>::try_from(&w).unwrap();
        assert!((before[0] - after[0] - 0.5 * 2.71 * 0.2).abs() < 1e-5);
    }

    /// The overlapped inner steps' progress, taken as the difference of two pseudo-gradients
    /// against the old global state, lands on top of the committed outer step.
    #[test]
    fn progress_between_two_pseudo_gradients_goes_on_top_of_the_outer_step() {
        let (vs, w) = store(&[1.0, 2.0]);
        let mut outer = OuterOptimizer::new(&vs, DilocoConfig::default()).unwrap();
        let set = |v: [f32; 2]| tch::no_grad(|| w.shallow_clone().copy_(&Tensor::from_slice(&v)));
        set([0.5, 2.5]);
        let sent = outer.pseudo_gradient(&vs);
        // The tail moves the parameters by [0.25, -0.125] while the sync runs.
        set([0.75, 2.375]);
        let after = outer.pseudo_gradient(&vs);
        let progress: Vec<f32> = sent.iter().zip(&after).map(|(b, a)| b - a).collect();
        let p = outer.propose(&sent, 1, 0.0).unwrap();
        outer.commit(p, &vs);
        let global = Vec::<f32>::try_from(&w).unwrap();
        outer.add_to_params(&vs, &progress).unwrap();
        let got = Vec::<f32>::try_from(&w).unwrap();
        assert!(
            (got[0] - global[0] - 0.25).abs() < 1e-6,
            "{got:?} {global:?}"
        );
        assert!(
            (got[1] - global[1] + 0.125).abs() < 1e-6,
            "{got:?} {global:?}"
        );
        let err = outer.add_to_params(&vs, &[1.0]).unwrap_err().to_string();
        assert!(err.contains("1 values"), "{err}");
    }

    /// The outer lr of each round follows the members it averaged: √K with `outer_lr_scaling =
    /// "sqrt-members"` (a round of one member is plain averaging), fixed by default.
    #[test]
    fn the_outer_lr_grows_with_the_square_root_of_the_round_s_members() {
        let (vs, w) = store(&[1.0]);
        let scaled = DilocoConfig {
            outer_lr_scaling: forge_protocol::run_config::OuterLrScaling::SqrtMembers,
            ..DilocoConfig::default()
        };
        let mut outer = OuterOptimizer::new(&vs, scaled).unwrap();
        let mut steps = vec![];
        // Rounds of 4, 3 (one member gone), 1 (alone) and 2 members, each averaging 0.5.
        for members in [4, 3, 1, 2] {
            let before = Vec::<f32>::try_from(&w).unwrap()[0];
            let p = outer.propose(&[0.5], members, 0.0).unwrap();
            outer.commit(p, &vs);
            steps.push(before - Vec::<f32>::try_from(&w).unwrap()[0]);
        }
        let want = [1.0, 3f32.sqrt() / 2.0, 0.5, 2f32.sqrt() / 2.0];
        for (got, want) in steps.iter().zip(want) {
            assert!((got - want).abs() < 1e-6, "{steps:?} against {want}");
        }
        let fixed = DilocoConfig {
            outer_lr_scaling: forge_protocol::run_config::OuterLrScaling::None,
            outer_lr: 0.8,
            ..DilocoConfig::default()
        };
        let (vs, w) = store(&[1.0]);
        let mut outer = OuterOptimizer::new(&vs, fixed).unwrap();
        let p = outer.propose(&[0.5], 4, 0.0).unwrap();
        outer.commit(p, &vs);
        assert!((Vec::<f32>::try_from(&w).unwrap()[0] - 0.6).abs() < 1e-6);
    }

    /// `outer_lr_scaling = "norm-ratio"`: the step takes the average's direction at the length
    /// of the members' mean norm, measured on the average itself (norm 5 here), within [1, √K].
    #[test]
    fn the_norm_ratio_stretches_the_average_to_the_members_mean_norm() {
        let ratio = DilocoConfig {
            outer_lr_scaling: OuterLrScaling::NormRatio,
            ..DilocoConfig::default()
        };
        let mut lrs = vec![];
        // Members whose mean norm was 7.5, 5 (all alike), 30 (past √4), 0 (not measured), and
        // a round of one member.
        for (members, member_norm) in [(4, 7.5), (4, 5.0), (4, 30.0), (4, 0.0), (1, 30.0)] {
            let (vs, w) = store(&[1.0, 1.0]);
            let mut outer = OuterOptimizer::new(&vs, ratio).unwrap();
            let p = outer.propose(&[3.0, 4.0], members, member_norm).unwrap();
            let lr = p.outer_lr as f32;
            lrs.push(p.outer_lr);
            outer.commit(p, &vs);
            let moved = Vec::<f32>::try_from(&w).unwrap();
            for (got, want) in moved.iter().zip([1.0 - 3.0 * lr, 1.0 - 4.0 * lr]) {
                assert!((got - want).abs() < 1e-5, "{moved:?} against {want}");
            }
        }
        assert_eq!(lrs, [1.5, 1.0, 2.0, 1.0, 1.0]);
    }

    #[test]
    fn proposals_hash_deterministically_and_are_not_applied_until_committed() {
        let (vs, w) = store(&[1.0, 2.0, 3.0]);
        let outer = OuterOptimizer::new(&vs, DilocoConfig::default()).unwrap();
        let a = outer.propose(&[0.1, 0.2, 0.3], 1, 0.0).unwrap();
        let b = outer.propose(&[0.1, 0.2, 0.3], 1, 0.0).unwrap();
        let c = outer.propose(&[0.1, 0.2, 0.30001], 1, 0.0).unwrap();
        assert_eq!(a.params_hash, b.params_hash);
        assert_ne!(a.params_hash, c.params_hash);
        assert_eq!(Vec::<f32>::try_from(&w).unwrap(), vec![1.0, 2.0, 3.0]);
        assert_ne!(outer.global_hash().0, a.params_hash);
        assert!(
            outer
                .propose(&[0.1], 1, 0.0)
                .unwrap_err()
                .to_string()
                .contains("1 values")
        );
    }

    #[test]
    fn params_hash_is_sha256_over_the_tensor_digests_in_name_order() {
        // Computed outside Rust: sha256(sha256(b as f32 LE) ++ sha256(w as f32 LE)). Every
        // node and the coordinator compare these values, so they must never change.
        let vs = VarStore::new(Device::Cpu);
        let w = vs.root().var("w", &[3], nn::Init::Const(0.0));
        let b = vs.root().var("b", &[2], nn::Init::Const(0.0));
        tch::no_grad(|| {
            w.shallow_clone()
                .copy_(&Tensor::from_slice(&[1.0f32, 2.0, 3.0]));
            b.shallow_clone()
                .copy_(&Tensor::from_slice(&[0.5f32, -1.0]));
        });
        let outer = OuterOptimizer::new(&vs, DilocoConfig::default()).unwrap();
        let (params_hash, per_tensor) = outer.global_hash();
        assert_eq!(
            hex::encode(params_hash),
            "880aa144188c9b8f55256f6af4d1c530651f4e2f1e169d4b55427482569f9a14"
        );
        let per_tensor: Vec<(TensorKey, String)> = per_tensor
            .into_iter()
            .map(|(key, digest)| (key, hex::encode(digest)))
            .collect();
        assert_eq!(
            per_tensor,
            [
                (
                    TensorKey::Param("b".into()),
                    "031a5e93e726630d2e7087e4356829de6907683f3a2aba769e5155e7a068d167".into()
                ),
                (
                    TensorKey::Param("w".into()),
                    "8e628779e6a74ee0b36991c10158f63cafec7d340ad4e075592502c8708524dd".into()
                ),
            ]
        );
    }

    #[test]
    fn state_round_trips() {
        let (vs, _w) = store(&[1.0, 2.0]);
        let cfg = crate::outer_state::tests::with_momentum();
        let mut outer = OuterOptimizer::new(&vs, cfg).unwrap();
        let p = outer.propose(&[0.5, -0.5], 1, 0.0).unwrap();
        outer.commit(p, &vs);
        let saved: HashMap<TensorKey, Tensor> = outer
            .state_tensors()
            .into_iter()
            .map(|(k, t)| (k, t.copy()))
            .collect();
        let mut fresh = OuterOptimizer::new(&vs, cfg).unwrap();
        fresh.load_state_tensors(&saved).unwrap();
        assert_eq!(fresh.global_hash(), outer.global_hash());
        let next_a = outer.propose(&[0.1, 0.1], 1, 0.0).unwrap();
        let next_b = fresh.propose(&[0.1, 0.1], 1, 0.0).unwrap();
        assert_eq!(
            next_a.params_hash, next_b.params_hash,
            "momentum restored too"
        );
    }
}
