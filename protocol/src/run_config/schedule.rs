//! `[train.schedule]`: the shape of the learning rate over a run: warmup + cosine, WSD
//! (warmup–stable–decay), InfiniteLR (warmup, cosine down to a constant, optional final anneal)
//! or constant; and the decay phase entered early ([`Anneal`], `control anneal`).

use serde::{Deserialize, Serialize};

use super::diloco::{rounds_for, step_at_version};
use super::{ConfigError, RunConfig};

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
                let decay_steps = wsd_decay_steps(total, decay_fraction);
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

    /// Steps of the decay phase that an anneal enters, in a run of `total` steps: WSD's
    /// `decay_fraction` of the run, InfiniteLR's `anneal_steps`. A cosine schedule decays all
    /// along and a constant one never: neither has a phase to enter.
    pub fn decay_steps(&self, total: u64) -> Result<u64, ConfigError> {
        match *self {
            Schedule::Wsd { decay_fraction, .. } => Ok(wsd_decay_steps(total, decay_fraction)),
            Schedule::Infinite { anneal_steps, .. } if anneal_steps > 0 => Ok(anneal_steps),
            _ => Err(ConfigError::InvalidTrain(NO_DECAY_PHASE.to_string())),
        }
    }

    /// The anneal that starts at optimizer step `step` of a run of `total` steps (see
    /// [`Anneal`]).
    pub fn anneal_at(&self, step: u64, total: u64) -> Result<Anneal, ConfigError> {
        Ok(Anneal::entered(step, total, self.decay_steps(total)?))
    }

    /// [`Schedule::factor`] with the decay phase entered where `anneal` says: from the
    /// schedule's value just before `anneal.start`, linearly down to its floor over
    /// `anneal.steps` (WSD's own decay, had the run been planned to end there).
    pub fn factor_annealed(&self, step: u64, total: u64, anneal: Option<Anneal>) -> f64 {
        let (Some(anneal), Some(floor)) = (anneal, self.floor()) else {
            return self.factor(step, total);
        };
        if step < anneal.start || anneal.steps == 0 {
            return self.factor(step, total);
        }
        let from = self.factor(anneal.start.saturating_sub(1), total);
        let progress = (step - anneal.start + 1) as f64 / anneal.steps as f64;
        from - (from - floor) * progress.min(1.0)
    }

    /// Where the decay phase ends, as a multiple of the peak (None: no decay phase).
    fn floor(&self) -> Option<f64> {
        match *self {
            Schedule::Wsd { min_lr_ratio, .. } | Schedule::Infinite { min_lr_ratio, .. } => {
                Some(min_lr_ratio)
            }
            Schedule::Cosine { .. } | Schedule::Constant { .. } => None,
        }
    }
}

/// Why a schedule cannot anneal.
pub const NO_DECAY_PHASE: &str = "[train.schedule] has no decay phase to enter (a cosine \
     schedule decays all along, a constant one never): anneal needs kind = \"wsd\", or \
     kind = \"infinite\" with anneal_steps > 0";

fn wsd_decay_steps(total: u64, decay_fraction: f64) -> u64 {
    ((total as f64 * decay_fraction).round() as u64).max(1)
}

/// The schedule's decay phase entered early (`forge-coordinator control anneal`, `forge-node
/// control anneal`): from optimizer step `start` the learning rate falls linearly to the
/// schedule's floor over `steps` steps, the length the config gives the decay phase, and the
/// run ends with it. An anneal asked for once the planned decay has begun is that decay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anneal {
    pub start: u64,
    pub steps: u64,
}

impl Anneal {
    /// The decay of `decay_steps` entered at `step` of a run of `total` steps, or the planned
    /// one if it starts earlier.
    fn entered(step: u64, total: u64, decay_steps: u64) -> Anneal {
        Anneal {
            start: step.min(total.saturating_sub(decay_steps)),
            steps: decay_steps,
        }
    }

    /// The step the run ends at: the decay's end.
    pub fn end(&self) -> u64 {
        self.start + self.steps
    }
}

/// What a DiLoCo run's coordinator needs to anneal it: the run's budget and decay phase in
/// inner steps, and how global versions map to them. Nodes compute the same with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnealPlan {
    pub total_steps: u64,
    pub decay_steps: u64,
    pub inner_steps: u64,
    pub sync_warmup_steps: u64,
}

impl AnnealPlan {
    /// The anneal whose decay starts with the round that starts from global `version`.
    pub fn anneal(&self, version: u64) -> Anneal {
        let step = step_at_version(self.inner_steps, self.sync_warmup_steps, version);
        Anneal::entered(step, self.total_steps, self.decay_steps)
    }

    /// The global version the run ends at when its decay starts from global `version`.
    pub fn final_version(&self, version: u64) -> u64 {
        let end = self.anneal(version).end();
        rounds_for(self.inner_steps, self.sync_warmup_steps, end)
    }
}

impl RunConfig {
    /// How this DiLoCo run anneals; an error when it has no `[diloco]` table or its schedule
    /// no decay phase.
    pub fn anneal_plan(&self) -> Result<AnnealPlan, ConfigError> {
        let diloco = self.diloco.ok_or_else(|| {
            ConfigError::InvalidTrain("a run across machines needs a [diloco] table".into())
        })?;
        let total_steps = self.total_steps();
        Ok(AnnealPlan {
            total_steps,
            decay_steps: self.train.schedule.decay_steps(total_steps)?,
            inner_steps: diloco.inner_steps,
            sync_warmup_steps: diloco.sync_warmup_steps,
        })
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

    /// InfiniteLR: 10 warmup steps, 40 of cosine down to 0.3, the last `anneal_steps` to 0.
    fn infinite(anneal_steps: u64) -> Schedule {
        Schedule::Infinite {
            warmup_steps: 10,
            cooldown_steps: 40,
            constant_lr_ratio: 0.3,
            anneal_steps,
            min_lr_ratio: 0.0,
        }
    }

    #[test]
    fn infinite_reaches_its_constant_then_anneals() {
        let s = infinite(20);
        s.validate(200).unwrap();
        assert!(close(s.factor(10, 200), 1.0));
        assert!(close(s.factor(50, 200), 0.3));
        assert!(close(s.factor(179, 200), 0.3));
        assert!(close(s.factor(199, 200), 0.0));
        assert!(close(infinite(0).factor(199, 200), 0.3));
    }

    #[test]
    fn an_anneal_is_the_wsd_decay_moved_earlier() {
        let s = Schedule::Wsd {
            warmup_steps: 5,
            decay_fraction: 0.2,
            min_lr_ratio: 0.1,
        };
        // 20 decay steps entered at step 40 of 100: the decay of a run planned to end at 60.
        let anneal = s.anneal_at(40, 100).unwrap();
        assert_eq!(
            anneal,
            Anneal {
                start: 40,
                steps: 20
            }
        );
        assert_eq!(anneal.end(), 60);
        for step in 0..40 {
            assert!(close(
                s.factor_annealed(step, 100, Some(anneal)),
                s.factor(step, 100)
            ));
        }
        // The planned decay's shape (80..100), from step 40.
        for step in 40..60 {
            assert!(close(
                s.factor_annealed(step, 100, Some(anneal)),
                s.factor(step + 40, 100)
            ));
        }
        assert!(close(s.factor_annealed(59, 100, Some(anneal)), 0.1));
        // Asked for once the planned decay has begun: that decay, unchanged.
        let late = s.anneal_at(90, 100).unwrap();
        assert_eq!(
            late,
            Anneal {
                start: 80,
                steps: 20
            }
        );
        for step in 0..100 {
            assert!(close(
                s.factor_annealed(step, 100, Some(late)),
                s.factor(step, 100)
            ));
        }
    }

    #[test]
    fn an_infinite_schedule_anneals_from_its_constant_and_cosine_cannot() {
        let s = infinite(20);
        let anneal = s.anneal_at(100, 200).unwrap();
        assert_eq!(anneal.end(), 120);
        assert!(close(s.factor_annealed(99, 200, Some(anneal)), 0.3));
        assert!(close(s.factor_annealed(109, 200, Some(anneal)), 0.15));
        assert!(close(s.factor_annealed(119, 200, Some(anneal)), 0.0));
        let cosine = Schedule::Cosine {
            warmup_steps: 10,
            min_lr_ratio: 0.1,
        };
        let err = cosine.anneal_at(50, 100).unwrap_err().to_string();
        assert!(err.contains("no decay phase"), "{err}");
        assert!(close(
            cosine.factor_annealed(60, 100, Some(anneal)),
            cosine.factor(60, 100)
        ));
    }

    #[test]
    fn an_anneal_plan_ends_the_run_when_its_decay_does() {
        // 300 steps in rounds of 5, 60 decay steps (0.2): planned to end at version 60.
        let plan = AnnealPlan {
            total_steps: 300,
            decay_steps: 60,
            inner_steps: 5,
            sync_warmup_steps: 0,
        };
        assert_eq!(
            plan.anneal(10),
            Anneal {
                start: 50,
                steps: 60
            }
        );
        assert_eq!(plan.final_version(10), 22);
        assert_eq!(plan.final_version(50), 60);
        // Decay steps that are no multiple of H: the last round is shorter.
        let odd = AnnealPlan {
            decay_steps: 7,
            ..plan
        };
        assert_eq!(odd.final_version(10), 12);
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
