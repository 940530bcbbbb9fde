//! `[train.schedule]`: the shape of the learning rate over a run: warmup + cosine, WSD
//! (warmup–stable–decay), InfiniteLR (warmup, cosine down to a constant, optional final anneal)
//! or constant.

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// The shape of the learning rate over a run of `total_steps` optimizer steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Schedule {
    /// Linear warmup to the peak, then cosine to `min_lr_ratio · peak` at the last step.
    Cosine {
        warmup_steps: u64,
        min_lr_ratio: f64,
    },
    /// Warmup, constant peak, then a linear decay over the last `decay_fraction` of steps.
    Wsd {
        warmup_steps: u64,
        decay_fraction: f64,
        min_lr_ratio: f64,
    },
    /// Warmup, cosine over `cooldown_steps` down to `constant_lr_ratio · peak`, constant after;
    /// if `anneal_steps > 0`, the last `anneal_steps` of the budget decay linearly to
    /// `min_lr_ratio · peak`. Suits open-ended and continued pretraining.
    Infinite {
        warmup_steps: u64,
        cooldown_steps: u64,
        constant_lr_ratio: f64,
        anneal_steps: u64,
        min_lr_ratio: f64,
    },
    /// Warmup, then the peak for the rest of the run.
    Constant { warmup_steps: u64 },
}

impl Schedule {
    /// Checks the schedule against a budget of `total_steps`.
    pub fn validate(&self, total_steps: u64) -> Result<(), ConfigError> {
        let bad = |why: String| Err(ConfigError::InvalidTrain(format!("[train.schedule] {why}")));
        let ratio_ok = |r: f64| (0.0..=1.0).contains(&r);
        let warmup = self.warmup_steps();
        if warmup >= total_steps {
            return bad(format!(
                "warmup_steps {warmup} must be below the run's {total_steps} steps"
            ));
        }
        match *self {
            Schedule::Cosine { min_lr_ratio, .. } if !ratio_ok(min_lr_ratio) => bad(format!(
                "min_lr_ratio must be in [0, 1], got {min_lr_ratio}"
            )),
            Schedule::Wsd {
                decay_fraction,
                min_lr_ratio,
                ..
            } => {
                if !(decay_fraction > 0.0 && decay_fraction <= 1.0) {
                    return bad(format!(
                        "decay_fraction must be in (0, 1], got {decay_fraction}"
                    ));
                }
                if !ratio_ok(min_lr_ratio) {
                    return bad(format!(
                        "min_lr_ratio must be in [0, 1], got {min_lr_ratio}"
                    ));
                }
                Ok(())
            }
            Schedule::Infinite {
                warmup_steps,
                cooldown_steps,
                constant_lr_ratio,
                anneal_steps,
                min_lr_ratio,
            } => {
                if !ratio_ok(constant_lr_ratio) || !ratio_ok(min_lr_ratio) {
                    return bad("constant_lr_ratio and min_lr_ratio must be in [0, 1]".into());
                }
                if warmup_steps + cooldown_steps + anneal_steps > total_steps {
                    return bad(format!(
                        "warmup_steps + cooldown_steps + anneal_steps ({}) exceed the run's {total_steps} steps",
                        warmup_steps + cooldown_steps + anneal_steps
                    ));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn warmup_steps(&self) -> u64 {
        match *self {
            Schedule::Cosine { warmup_steps, .. }
            | Schedule::Wsd { warmup_steps, .. }
            | Schedule::Infinite { warmup_steps, .. }
            | Schedule::Constant { warmup_steps } => warmup_steps,
        }
    }

    /// Multiplier of the peak learning rate at optimizer step `step` (0-based) of `total`.
    pub fn factor(&self, step: u64, total: u64) -> f64 {
        let warmup = self.warmup_steps();
        if step < warmup {
            return (step + 1) as f64 / warmup as f64;
        }
        let cosine = |progress: f64, floor: f64| {
            floor
                + (1.0 - floor)
                    * 0.5
                    * (1.0 + (std::f64::consts::PI * progress.clamp(0.0, 1.0)).cos())
        };
        let last = total.saturating_sub(1).max(warmup + 1);
        match *self {
            Schedule::Cosine { min_lr_ratio, .. } => cosine(
                (step - warmup) as f64 / (last - warmup) as f64,
                min_lr_ratio,
            ),
            Schedule::Wsd {
                decay_fraction,
                min_lr_ratio,
                ..
            } => {
                let decay_steps = ((total as f64 * decay_fraction).round() as u64).max(1);
                let decay_start = total.saturating_sub(decay_steps);
                if step < decay_start {
                    1.0
                } else {
                    let progress = (step - decay_start + 1) as f64 / decay_steps as f64;
                    1.0 - (1.0 - min_lr_ratio) * progress.min(1.0)
                }
            }
            Schedule::Infinite {
                cooldown_steps,
                constant_lr_ratio,
                anneal_steps,
                min_lr_ratio,
                ..
            } => {
                let anneal_start = total.saturating_sub(anneal_steps);
                if anneal_steps > 0 && step >= anneal_start {
                    let progress = (step - anneal_start + 1) as f64 / anneal_steps as f64;
                    constant_lr_ratio - (constant_lr_ratio - min_lr_ratio) * progress.min(1.0)
                } else if step < warmup + cooldown_steps {
                    cosine(
                        (step - warmup) as f64 / cooldown_steps as f64,
                        constant_lr_ratio,
                    )
                } else {
                    constant_lr_ratio
                }
            }
            Schedule::Constant { .. } => 1.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn cosine_warms_up_peaks_and_ends_at_the_floor() {
        let s = Schedule::Cosine {
            warmup_steps: 10,
            min_lr_ratio: 0.1,
        };
        s.validate(100).unwrap();
        assert!(close(s.factor(0, 100), 0.1));
        assert!(close(s.factor(9, 100), 1.0));
        assert!(close(s.factor(10, 100), 1.0));
        assert!(close(s.factor(99, 100), 0.1));
        let mid = s.factor(54, 100);
        assert!(mid > 0.5 && mid < 0.6, "{mid}");
        for step in 10..99 {
            assert!(s.factor(step + 1, 100) <= s.factor(step, 100) + 1e-12);
        }
    }

    #[test]
    fn wsd_is_flat_then_decays_linearly() {
        let s = Schedule::Wsd {
            warmup_steps: 5,
            decay_fraction: 0.2,
            min_lr_ratio: 0.0,
        };
        s.validate(100).unwrap();
        assert!(close(s.factor(50, 100), 1.0));
        assert!(close(s.factor(79, 100), 1.0));
        assert!(close(s.factor(80, 100), 0.95));
        assert!(close(s.factor(99, 100), 0.0));
    }

    #[test]
    fn infinite_reaches_its_constant_then_anneals() {
        let s = Schedule::Infinite {
            warmup_steps: 10,
            cooldown_steps: 40,
            constant_lr_ratio: 0.3,
            anneal_steps: 20,
            min_lr_ratio: 0.0,
        };
        s.validate(200).unwrap();
        assert!(close(s.factor(10, 200), 1.0));
        assert!(close(s.factor(50, 200), 0.3));
        assert!(close(s.factor(179, 200), 0.3));
        assert!(close(s.factor(199, 200), 0.0));
        let no_anneal = Schedule::Infinite {
            warmup_steps: 10,
            cooldown_steps: 40,
            constant_lr_ratio: 0.3,
            anneal_steps: 0,
            min_lr_ratio: 0.0,
        };
        assert!(close(no_anneal.factor(199, 200), 0.3));
    }

    #[test]
    fn bad_schedules_are_explained() {
        let s = Schedule::Cosine {
            warmup_steps: 100,
            min_lr_ratio: 0.1,
        };
        assert!(
            s.validate(50)
                .unwrap_err()
                .to_string()
                .contains("warmup_steps 100")
        );
        let s = Schedule::Infinite {
            warmup_steps: 10,
            cooldown_steps: 100,
            constant_lr_ratio: 0.3,
            anneal_steps: 100,
            min_lr_ratio: 0.0,
        };
        assert!(s.validate(150).unwrap_err().to_string().contains("exceed"));
        let parsed: std::result::Result<Schedule, _> =
            toml::from_str("kind = \"cosine\"\nwarmup_steps = 3\nmin_lr_ratio = 0.1\nfoo = 1");
        assert!(parsed.is_err());
        let parsed: Schedule = toml::from_str(
            "kind = \"wsd\"\nwarmup_steps = 3\ndecay_fraction = 0.2\nmin_lr_ratio = 0.0",
        )
        .unwrap();
        assert!(matches!(parsed, Schedule::Wsd { .. }));
    }
}
