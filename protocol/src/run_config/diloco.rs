//! `[diloco]`: how replicas on different machines train together (inner steps per round, the
//! outer optimizer, outer-gradient compression).

use serde::{Deserialize, Serialize};

use super::ConfigError;
use crate::quant::{Codec, Compression};

/// `[diloco]` in a run config: how replicas on different machines train together.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DilocoConfig {
    /// Inner steps per round (H): 30–100 from scratch, about 500 from a pretrained start.
    pub inner_steps: u64,
    /// A node stops its inner loop early after this many seconds, so a slow node does fewer
    /// steps instead of holding the others up (0: no budget).
    pub round_seconds: f64,
    /// Outer learning rate: 0.7 at H=500, about 0.4–0.8 for H=30–100 (DiLoCo).
    pub outer_lr: f64,
    /// Momentum of the outer SGD.
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
    /// their progress goes on top of the outer step when it arrives, so the node never waits
    /// for the all-reduce (0: blocking, the node idles through it). About the outer sync's
    /// seconds over an inner step's; a round of one step and the run's last round never
    /// overlap, nor do pipeline stages.
    #[serde(default)]
    pub overlap_steps: u64,
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

impl Default for DilocoConfig {
    fn default() -> Self {
        DilocoConfig {
            inner_steps: 50,
            round_seconds: 0.0,
            outer_lr: 0.7,
            outer_momentum: 0.9,
            nesterov: true,
            compression: Compression {
                codec: Codec::Int8 { block_size: 256 },
                zstd: Some(3),
            },
            eval_every_rounds: 5,
            sync_warmup_steps: 0,
            pace: Pace::Auto,
            overlap_steps: 0,
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
        let warm = self.sync_warmup_steps;
        if version <= warm {
            version
        } else {
            warm + (version - warm) * self.inner_steps
        }
    }

    /// Rounds that take a replica through `total_steps` inner steps: the synchronous warmup's
    /// rounds of one step, then rounds of `inner_steps` (the last one shorter). 0 for 0 steps.
    pub fn rounds_for(&self, total_steps: u64) -> u64 {
        let warm = self.sync_warmup_steps.min(total_steps);
        warm + (total_steps - warm).div_ceil(self.inner_steps.max(1))
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
        if self.overlap_steps >= self.inner_steps {
            return bad(format!(
                "overlap_steps ({}) must be below inner_steps ({}): a round needs one step \
                 before its outer gradients can start to travel",
                self.overlap_steps, self.inner_steps
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
            overlap_steps: 5,
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
