//! `[diloco]`: how replicas on different machines train together (inner steps per round, the
//! outer optimizer, outer-gradient compression).

use serde::{Deserialize, Serialize};

use super::{ConfigError, OptimizerKind};
use crate::quant::{Codec, Compression};

/// `[diloco]` in a run config: how replicas on different machines train together. A key left
/// out takes its [`Default`] value.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DilocoConfig {
    /// Inner steps per round (H): 30–100 from scratch, about 500 from a pretrained start; fewer
    /// keep more of the synchronous gain when each node's batch is small (a few thousand tokens).
    pub inner_steps: u64,
    /// A node stops its inner loop early after this many seconds, so a slow node does fewer
    /// steps instead of holding the others up (0: no budget).
    pub round_seconds: f64,
    /// Outer learning rate. 1.0 with no momentum and no scaling is plain averaging of the
    /// replicas; see [`DilocoConfig::plan_warning`] for what heavier settings cost.
    pub outer_lr: f64,
    /// How the outer lr grows with the number of members K whose replicas a round averages:
    /// `"norm-ratio"` (the default) multiplies it by how far the members' progress disagrees,
    /// from 1 to √K; `"sqrt-members"` by √K (for Muon inner steps in short rounds); `"none"`
    /// keeps it as set. See [`OuterLrScaling`].
    #[serde(default)]
    pub outer_lr_scaling: OuterLrScaling,
    /// Momentum of the outer SGD (DiLoCo's paper: 0.9 with outer lr 0.7, for runs of hundreds
    /// of rounds with large per-node batches).
    pub outer_momentum: f64,
    /// Nesterov momentum (the DiLoCo default) or plain heavy-ball.
    pub nesterov: bool,
    /// How pseudo-gradients travel: `{ codec = "int8", block_size = 256, zstd = 3 }`; codecs
    /// fp32, bf16, int8, int4, topk (`density` and `bits` too); lossy ones use error feedback.
    pub compression: Compression,
    /// Validation loss every this many rounds.
    pub eval_every_rounds: u64,
    /// The run's first this many inner steps go in rounds of one step (synchronous data
    /// parallelism through the outer step), then rounds of `inner_steps`: replicas drift apart
    /// most early in training, when a round costs little against the progress it protects.
    #[serde(default)]
    pub sync_warmup_steps: u64,
    /// How much each node trains per round: `auto` (the default) gives every node the same wall
    /// time per round once their measured speeds differ by more than a quarter, so a fast node
    /// does more inner steps instead of waiting for a slow one at the all-reduce; `fixed` keeps
    /// H steps everywhere.
    #[serde(default)]
    pub pace: Pace,
    /// The last this many inner steps of each round run while its outer gradients travel, and
    /// their progress goes on top of the outer step when it arrives, so the node does not wait
    /// for the all-reduce: `"auto"` (the default: each node as many as its last outer sync took
    /// at its own speed, at least one, at most half a round) or a number (0: blocking, the node
    /// idles through the sync). A round of one step and the run's last round never overlap, nor
    /// do pipeline stages.
    #[serde(default)]
    pub overlap_steps: OverlapSteps,
}

/// Outer steps of this many times the averaged pseudo-gradient or more
/// ([`DilocoConfig::outer_step_multiple`]) lost against one node alone on the quality bench.
pub const MAX_OUTER_STEP_MULTIPLE: f64 = 2.0;

/// Runs of fewer rounds than this are where [`MAX_OUTER_STEP_MULTIPLE`] was measured (up to 60
/// rounds) and what [`DilocoConfig::plan_warning`] warns for.
pub const FEW_ROUNDS: u64 = 100;

/// `[diloco] outer_lr_scaling`: the outer lr of a round that averages K replicas.
///
/// Why √K: Muon takes steps of the same size whatever the noise in its gradients, so a replica
/// whose batch is small spends much of each step on noise. K replicas averaged keep each one's
/// progress along the direction they share and shrink the rest by √K; one node with K× the
/// batch, whose gradients carry √K times less noise, spends up to √K times more of the same
/// step on that direction. Scaling the average by √K restores both where noise dominates the
/// replicas' progress over a round (small batches, short rounds); where it does not, it
/// overshoots. A round of one member is never scaled (√1 = 1). The DiLoCo scaling-law study
/// (arXiv 2503.09799) also finds the best outer lr growing with the number of replicas.
/// Measured (docs/benchmarks/diloco-outer.md): with Muon, 2 nodes and H = 5 (the demo) √2 took
/// the share of the synchronous gain kept from 0.58 to above 1 (DiLoCo beat synchronous
/// training); with AdamW it lost against plain averaging; with Muon, 4 nodes and H = 30 on
/// Wikipedia √4 = 2 ended worse than plain averaging and a fixed 1.5 better; hence not the
/// default.
///
/// `"norm-ratio"` measures instead of assuming: it scales the average by the ratio of the
/// members' pseudo-gradient norm (root mean square) to the norm of their average, so the outer
/// step is as long as a typical member's progress over the round, in the direction they share.
/// Replicas that moved alike give 1 (plain averaging); replicas whose progress shares nothing
/// give √K (the `"sqrt-members"` factor); in between, the share the replicas have in common
/// decides. Capped to [1, √K], so members that cancel out cannot blow the step up. The idea is FedExP's
/// (Jhunjhunwala et al., ICLR 2023), which sets the server step from the same two quantities.
/// It is the default: on the quality bench it beat plain averaging in every setting tried (the
/// demo with AdamW and with Muon, 4 nodes at H = 30 on Wikipedia with Muon), where √K lost with
/// AdamW and at H = 30; a tuned fixed factor did better at each scale, no one factor at both.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OuterLrScaling {
    /// `outer_lr` whatever the number of members.
    None,
    /// `outer_lr` × √(members of the round).
    SqrtMembers,
    /// `outer_lr` × (the members' pseudo-gradient norm / the norm of their average), within
    /// [1, √(members)].
    #[default]
    NormRatio,
}

/// What a round's outer step averaged, as far as [`OuterLrScaling`] needs it; the same on every
/// member of the round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    /// Replicas averaged.
    pub members: usize,
    /// The members' pseudo-gradient norm, the root mean square weighted as the average is (by
    /// tokens).
    pub member_norm: f64,
    /// The norm of the averaged pseudo-gradient.
    pub average_norm: f64,
}

impl OuterLrScaling {
    /// The factor for a round that averaged `spread` (1 for one member or none).
    pub fn factor(self, spread: Spread) -> f64 {
        let sqrt_members = (spread.members.max(1) as f64).sqrt();
        match self {
            OuterLrScaling::SqrtMembers => sqrt_members,
            OuterLrScaling::None => 1.0,
            OuterLrScaling::NormRatio => {
                let ratio = spread.member_norm / spread.average_norm;
                // No progress to measure (0 / 0) is plain averaging; an average of nothing
                // (x / 0) is the cap, on a step of length 0.
                if ratio.is_nan() {
                    1.0
                } else {
                    ratio.clamp(1.0, sqrt_members)
                }
            }
        }
    }
}

/// `[diloco] overlap_steps`: a number of inner steps, or `"auto"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverlapSteps {
    /// This many (0: none, the sync blocks).
    Steps(u64),
    /// Each node as many as its last outer sync took at its own speed, from 1 to half a round.
    Auto,
}

/// `"auto"` by default: on the quality bench, with the default outer step, overlapping cost
/// 0.04-0.31% of validation loss at the demo's scale (1 of 5 steps) and 0.24% (2 of 30) to 0.55%
/// (5 of 30) on Wikipedia, against a stall of the whole sync every round
/// (docs/benchmarks/diloco-quality-wikipedia.md).
impl Default for OverlapSteps {
    fn default() -> Self {
        OverlapSteps::Auto
    }
}

impl Serialize for OverlapSteps {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            OverlapSteps::Steps(n) => serializer.serialize_u64(*n),
            OverlapSteps::Auto => serializer.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for OverlapSteps {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = OverlapSteps;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a number of inner steps (0 for none) or \"auto\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<OverlapSteps, E> {
                Ok(OverlapSteps::Steps(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<OverlapSteps, E> {
                u64::try_from(v)
                    .map(OverlapSteps::Steps)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<OverlapSteps, E> {
                match v {
                    "auto" => Ok(OverlapSteps::Auto),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
                }
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl OverlapSteps {
    /// The steps of a round of `round_steps` to overlap, for a node whose last outer sync took
    /// `sync_s` seconds and whose inner steps take `us_per_step` (None: not measured yet), at
    /// least one step of the round left before them.
    pub fn steps(&self, round_steps: u64, sync_s: Option<f64>, us_per_step: Option<u64>) -> u64 {
        let wanted = match *self {
            OverlapSteps::Steps(n) => n,
            OverlapSteps::Auto => match (sync_s, us_per_step) {
                (Some(sync), Some(us)) if us > 0 => {
                    ((sync * 1e6 / us as f64).ceil() as u64).clamp(1, (round_steps / 2).max(1))
                }
                _ => 1,
            },
        };
        wanted.min(round_steps.saturating_sub(1))
    }
}

/// `[diloco] pace`: the inner steps of a round, fixed or following each node's speed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pace {
    /// Equal wall time per round when the nodes' speeds differ (H steps at the median speed).
    #[default]
    Auto,
    /// H inner steps on every node, whatever its speed.
    Fixed,
}

/// [`DilocoConfig::step_at_version`] of a run with rounds of `inner_steps` after
/// `sync_warmup_steps` rounds of one step.
pub(super) fn step_at_version(inner_steps: u64, sync_warmup_steps: u64, version: u64) -> u64 {
    if version <= sync_warmup_steps {
        version
    } else {
        sync_warmup_steps + (version - sync_warmup_steps) * inner_steps
    }
}

/// [`DilocoConfig::rounds_for`] of a run with rounds of `inner_steps` after `sync_warmup_steps`
/// rounds of one step.
pub(super) fn rounds_for(inner_steps: u64, sync_warmup_steps: u64, total_steps: u64) -> u64 {
    let warm = sync_warmup_steps.min(total_steps);
    warm + (total_steps - warm).div_ceil(inner_steps.max(1))
}

impl Default for DilocoConfig {
    fn default() -> Self {
        DilocoConfig {
            inner_steps: 30,
            round_seconds: 0.0,
            outer_lr: 1.0,
            outer_lr_scaling: OuterLrScaling::default(),
            outer_momentum: 0.0,
            nesterov: true,
            compression: Compression {
                codec: Codec::Int8 { block_size: 256 },
                zstd: Some(3),
            },
            eval_every_rounds: 5,
            sync_warmup_steps: 0,
            pace: Pace::Auto,
            overlap_steps: OverlapSteps::default(),
        }
    }
}

impl DilocoConfig {
    /// Inner steps of the round that starts at the run's inner step `step`.
    pub fn round_steps(&self, step: u64) -> u64 {
        if step < self.sync_warmup_steps {
            1
        } else {
            self.inner_steps
        }
    }

    /// The run's inner step at which the round that starts from global `version` begins, for a
    /// replica that played every round: the schedule's position (the run's progress, the same on
    /// every node whatever its own step count).
    pub fn step_at_version(&self, version: u64) -> u64 {
        step_at_version(self.inner_steps, self.sync_warmup_steps, version)
    }

    /// Rounds that take a replica through `total_steps` inner steps: the synchronous warmup's
    /// rounds of one step, then rounds of `inner_steps` (the last one shorter). 0 for 0 steps.
    pub fn rounds_for(&self, total_steps: u64) -> u64 {
        rounds_for(self.inner_steps, self.sync_warmup_steps, total_steps)
    }

    /// The outer lr of a round that averaged `spread`: `outer_lr` scaled by
    /// [`DilocoConfig::outer_lr_scaling`].
    pub fn outer_lr_for(&self, spread: Spread) -> f64 {
        self.outer_lr * self.outer_lr_scaling.factor(spread)
    }

    /// The outer step once momentum has built up, as a multiple of the default's (`outer_lr`
    /// 1.0, no momentum) against a steady averaged pseudo-gradient: `outer_lr / (1 -
    /// outer_momentum)` (heavy-ball and Nesterov alike), on top of
    /// [`DilocoConfig::outer_lr_scaling`]'s factor.
    pub fn outer_step_multiple(&self) -> f64 {
        self.outer_lr / (1.0 - self.outer_momentum)
    }

    /// One line for the user when the plan is of a kind Forge's quality bench saw lose:
    /// outer steps of [`MAX_OUTER_STEP_MULTIPLE`] or more times the averaged pseudo-gradient in
    /// a run of fewer than [`FEW_ROUNDS`] rounds (`rounds`: the run's planned rounds, 0 when it
    /// has no budget). Measured in docs/benchmarks/diloco-outer.md: such settings ended worse
    /// than one node alone, or no better, at 12, 33 and 60 rounds.
    pub fn plan_warning(&self, rounds: u64) -> Option<String> {
        let multiple = self.outer_step_multiple();
        if multiple < MAX_OUTER_STEP_MULTIPLE || rounds == 0 || rounds >= FEW_ROUNDS {
            return None;
        }
        Some(format!(
            "[diloco] outer_lr = {} with outer_momentum = {} takes outer steps of up to {multiple:.1}x \
             the default's (outer_lr = 1.0, no momentum); in runs of fewer than {FEW_ROUNDS} rounds (this one \
             plans {rounds}) such settings made DiLoCo end no better than one node alone on \
             Forge's quality bench (docs/benchmarks/diloco-outer.md): set outer_lr = 1.0 and \
             outer_momentum = 0 (the default)",
            self.outer_lr, self.outer_momentum
        ))
    }

    /// One line for the user when `outer_lr_scaling = "sqrt-members"` goes with an inner
    /// optimizer other than Muon (`inner`): with AdamW the quality bench saw it lose against
    /// plain averaging (docs/benchmarks/diloco-outer.md), where `"norm-ratio"` beat it.
    pub fn scaling_warning(&self, inner: OptimizerKind) -> Option<String> {
        if self.outer_lr_scaling != OuterLrScaling::SqrtMembers || inner == OptimizerKind::Muon {
            return None;
        }
        let kind = match inner {
            OptimizerKind::Adamw => "adamw",
            OptimizerKind::Muon => "muon",
            OptimizerKind::Adafactor => "adafactor",
        };
        Some(format!(
            "[diloco] outer_lr_scaling = \"sqrt-members\" with [train.optimizer] kind = \"{kind}\": \
             on Forge's quality bench (docs/benchmarks/diloco-outer.md) the scaling helped Muon \
             inner steps and made AdamW's end worse than plain averaging: set kind = \"muon\" or \
             outer_lr_scaling = \"norm-ratio\" (the default)"
        ))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |why: String| Err(ConfigError::InvalidTrain(format!("[diloco] {why}")));
        if self.inner_steps == 0 {
            return bad("inner_steps must be at least 1".into());
        }
        if !(self.outer_lr > 0.0 && self.outer_lr.is_finite()) {
            return bad(format!("outer_lr must be positive, got {}", self.outer_lr));
        }
        if !(0.0..1.0).contains(&self.outer_momentum) {
            return bad(format!(
                "outer_momentum must be in [0, 1), got {}",
                self.outer_momentum
            ));
        }
        if !(self.round_seconds >= 0.0 && self.round_seconds.is_finite()) {
            return bad(format!(
                "round_seconds must be 0 or positive, got {}",
                self.round_seconds
            ));
        }
        if let OverlapSteps::Steps(n) = self.overlap_steps
            && n >= self.inner_steps
        {
            return bad(format!(
                "overlap_steps ({n}) must be below inner_steps ({}): a round needs one step \
                 before its outer gradients can start to travel",
                self.inner_steps
            ));
        }
        if self.eval_every_rounds == 0 {
            return bad("eval_every_rounds must be at least 1".into());
        }
        self.compression
            .validate()
            .map_err(|e| ConfigError::InvalidTrain(format!("[diloco] compression: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_named() {
        DilocoConfig::default().validate().unwrap();
        let err = DilocoConfig {
            outer_momentum: 1.0,
            ..DilocoConfig::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(err.contains("[diloco] outer_momentum"), "{err}");
        let err = DilocoConfig {
            compression: Compression {
                codec: Codec::Int4 { block_size: 24 },
                zstd: None,
            },
            ..DilocoConfig::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(err.contains("[diloco] compression: "), "{err}");
        let err = DilocoConfig {
            inner_steps: 5,
            overlap_steps: OverlapSteps::Steps(5),
            ..DilocoConfig::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("overlap_steps (5) must be below inner_steps (5)"),
            "{err}"
        );
    }

    #[test]
    fn keys_left_out_take_the_defaults() {
        let cfg: DilocoConfig = toml::from_str("inner_steps = 10").unwrap();
        assert_eq!(
            cfg,
            DilocoConfig {
                inner_steps: 10,
                ..DilocoConfig::default()
            }
        );
        let cfg: DilocoConfig = toml::from_str("").unwrap();
        assert_eq!((cfg.outer_lr, cfg.outer_momentum), (1.0, 0.0));
        // A run overlaps its syncs unless told to block.
        assert_eq!(cfg.overlap_steps, OverlapSteps::Auto);
        assert!(toml::from_str::<DilocoConfig>("outer_lrr = 1.0").is_err());
    }

    #[test]
    fn the_outer_lr_scales_with_the_square_root_of_the_members_unless_told_not_to() {
        let cfg: DilocoConfig = toml::from_str("outer_lr = 0.8").unwrap();
        assert_eq!(cfg.outer_lr_scaling, OuterLrScaling::NormRatio);
        let cfg: DilocoConfig =
            toml::from_str("outer_lr = 0.8\nouter_lr_scaling = \"none\"").unwrap();
        let spread = Spread {
            members: 4,
            member_norm: 2.0,
            average_norm: 1.0,
        };
        assert_eq!(cfg.outer_lr_for(spread), 0.8);
        let cfg: DilocoConfig =
            toml::from_str("outer_lr = 0.8\nouter_lr_scaling = \"sqrt-members\"").unwrap();
        let lrs: Vec<f64> = (0..5).map(|k| cfg.outer_lr_for(unmeasured(k))).collect();
        assert_eq!(lrs, [0.8, 0.8, 0.8 * 2f64.sqrt(), 0.8 * 3f64.sqrt(), 1.6]);
        let err = toml::from_str::<DilocoConfig>("outer_lr_scaling = \"linear\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sqrt-members") && err.contains("none") && err.contains("norm-ratio"),
            "{err}"
        );
        // Measured to lose with AdamW: warned of, naming both keys.
        let warning = cfg.scaling_warning(OptimizerKind::Adamw).unwrap();
        assert!(
            warning.contains("kind = \"adamw\"")
                && warning.contains("outer_lr_scaling = \"norm-ratio\" (the default)"),
            "{warning}"
        );
        assert_eq!(cfg.scaling_warning(OptimizerKind::Muon), None);
        assert_eq!(
            DilocoConfig::default().scaling_warning(OptimizerKind::Adamw),
            None
        );
    }

    /// A round of `members` replicas whose norms nobody measured.
    fn unmeasured(members: usize) -> Spread {
        Spread {
            members,
            member_norm: 0.0,
            average_norm: 0.0,
        }
    }

    /// `"norm-ratio"`: the members' norm over their average's, within [1, √K]; a round
    /// whose norms nobody measured, or that moved nothing, is plain averaging.
    #[test]
    fn the_norm_ratio_scales_the_outer_lr_between_1_and_the_square_root_of_the_members() {
        let cfg: DilocoConfig =
            toml::from_str("outer_lr = 0.5\nouter_lr_scaling = \"norm-ratio\"").unwrap();
        let lr = |members, member_norm, average_norm| {
            cfg.outer_lr_for(Spread {
                members,
                member_norm,
                average_norm,
            })
        };
        // Four replicas that moved alike, half alike, and not alike at all (or cancelled out).
        assert_eq!(lr(4, 3.0, 3.0), 0.5);
        assert_eq!(lr(4, 3.0, 2.0), 0.75);
        assert_eq!(lr(4, 3.0, 1.5), 1.0);
        assert_eq!(lr(4, 3.0, 0.1), 1.0);
        assert_eq!(lr(4, 3.0, 0.0), 1.0);
        // Codec rounding can leave the average a little longer than the members' mean.
        assert_eq!(lr(4, 3.0, 3.01), 0.5);
        assert_eq!(lr(2, 3.0, 1.0), 0.5 * 2f64.sqrt());
        assert_eq!(lr(1, 3.0, 1.0), 0.5);
        assert_eq!(lr(4, 0.0, 0.0), 0.5);
        assert_eq!(cfg.outer_lr_for(unmeasured(4)), 0.5);
        // The default, measured to help AdamW too: no warning.
        assert_eq!(
            cfg,
            DilocoConfig {
                outer_lr: 0.5,
                ..DilocoConfig::default()
            }
        );
        assert_eq!(cfg.scaling_warning(OptimizerKind::Adamw), None);
    }

    #[test]
    fn heavy_outer_steps_in_a_short_run_are_warned_of() {
        let with = |outer_lr, outer_momentum| DilocoConfig {
            outer_lr,
            outer_momentum,
            ..DilocoConfig::default()
        };
        // Plain averaging, the default: never.
        assert_eq!(DilocoConfig::default().outer_step_multiple(), 1.0);
        assert_eq!(DilocoConfig::default().plan_warning(12), None);
        assert_eq!(with(1.5, 0.0).plan_warning(12), None);
        // The old demo setting: 5x, 12 rounds.
        let warning = with(0.5, 0.9).plan_warning(12).unwrap();
        for needle in [
            "outer_lr = 0.5 with outer_momentum = 0.9",
            "5.0x",
            "plans 12",
            "set outer_lr = 1.0 and outer_momentum = 0",
        ] {
            assert!(warning.contains(needle), "{needle}: {warning}");
        }
        assert!(with(2.0, 0.0).plan_warning(60).is_some());
        // Long runs, and runs without a budget, are not what the bench measured.
        assert_eq!(with(0.7, 0.9).plan_warning(FEW_ROUNDS), None);
        assert_eq!(with(0.7, 0.9).plan_warning(0), None);
    }

    #[test]
    fn overlap_steps_are_a_number_or_auto() {
        #[derive(Deserialize, Serialize)]
        struct T {
            overlap_steps: OverlapSteps,
        }
        let parse = |text: &str| toml::from_str::<T>(text).map(|t| t.overlap_steps);
        assert_eq!(parse("overlap_steps = 3").unwrap(), OverlapSteps::Steps(3));
        assert_eq!(
            parse("overlap_steps = \"auto\"").unwrap(),
            OverlapSteps::Auto
        );
        for bad in [
            "overlap_steps = -1",
            "overlap_steps = \"some\"",
            "overlap_steps = 1.5",
        ] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(
                err.contains("a number of inner steps (0 for none) or \"auto\""),
                "{err}"
            );
        }
        for v in [OverlapSteps::Steps(4), OverlapSteps::Auto] {
            let text = toml::to_string(&T { overlap_steps: v }).unwrap();
            assert_eq!(parse(&text).unwrap(), v, "{text}");
        }
        // A fixed count leaves a round one step; auto covers the sync, from 1 to half a round.
        assert_eq!(OverlapSteps::Steps(4).steps(30, None, None), 4);
        assert_eq!(OverlapSteps::Steps(4).steps(3, None, None), 2);
        assert_eq!(OverlapSteps::Steps(4).steps(1, None, None), 0);
        assert_eq!(OverlapSteps::Auto.steps(30, None, None), 1);
        assert_eq!(OverlapSteps::Auto.steps(30, Some(2.1), Some(500_000)), 5);
        assert_eq!(OverlapSteps::Auto.steps(30, Some(60.0), Some(500_000)), 15);
        assert_eq!(OverlapSteps::Auto.steps(30, Some(0.01), Some(500_000)), 1);
        assert_eq!(OverlapSteps::Auto.steps(1, Some(2.0), Some(500_000)), 0);
    }

    /// The rounds a replica plays for a budget of inner steps, as the node's rounds take them
    /// (rounds of one step through the warmup, then of H, the last one shorter).
    #[test]
    fn rounds_for_a_budget_follow_round_steps() {
        for (warmup, h, total) in [
            (0, 25, 300),
            (0, 25, 310),
            (3, 5, 60),
            (100, 5, 60),
            (0, 5, 0),
        ] {
            let cfg = DilocoConfig {
                inner_steps: h,
                sync_warmup_steps: warmup,
                ..DilocoConfig::default()
            };
            let (mut step, mut rounds) = (0, 0);
            while step < total {
                step += cfg.round_steps(step).min(total - step);
                rounds += 1;
            }
            assert_eq!(
                cfg.rounds_for(total),
                rounds,
                "warmup {warmup}, H {h}, {total} steps"
            );
        }
    }
}
