//! `[train.parallel]`: how a node spreads one replica over its local devices, and how a step's
//! batch splits over them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// The kind gradients travel in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GradDtype {
    #[default]
    Fp32,
    Bf16,
}

/// `[train.parallel]`: how a node spreads one replica over its devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParallelConfig {
    /// CPU only: data-parallel workers (threads) on the CPU.
    pub cpu_workers: usize,
    /// Sequences per forward/backward on each device, in `device` order (mixed GPUs in one box
    /// can be balanced); empty: `[train] micro_batch` everywhere.
    pub micro_batch: Vec<usize>,
    /// Gradient accumulation steps on each device; empty: the batch split evenly.
    pub accumulation: Vec<usize>,
    /// Gradients travel in flat buckets of at most this many MiB.
    pub bucket_mb: f64,
    /// fp32 or bf16 gradients on the wire between devices.
    pub grad_dtype: GradDtype,
    /// A worker that has not reached a collective this long after the first one is reported
    /// as crashed or hung.
    pub timeout_s: f64,
}

impl Default for ParallelConfig {
    fn default() -> Self {
        ParallelConfig {
            cpu_workers: 1,
            micro_batch: Vec::new(),
            accumulation: Vec::new(),
            bucket_mb: 25.0,
            grad_dtype: GradDtype::Fp32,
            timeout_s: 120.0,
        }
    }
}

/// One worker's share of a step: `micro_batch` sequences per forward/backward, `accumulation`
/// times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerBatch {
    pub micro_batch: usize,
    pub accumulation: usize,
}

impl WorkerBatch {
    pub fn sequences(&self) -> usize {
        self.micro_batch * self.accumulation
    }
}

impl ParallelConfig {
    /// Checks what does not depend on how many devices the node has (that is checked by
    /// [`ParallelConfig::worker_batches`] once the devices are known).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |why: String| Err(ConfigError::InvalidTrain(why));
        let positive = |x: f64| x.is_finite() && x > 0.0;
        if self.cpu_workers == 0 {
            return invalid("[train.parallel] cpu_workers must be at least 1".into());
        }
        if !positive(self.bucket_mb) || !positive(self.timeout_s) {
            return invalid("[train.parallel] bucket_mb and timeout_s must be positive".into());
        }
        for (name, list) in [
            ("micro_batch", &self.micro_batch),
            ("accumulation", &self.accumulation),
        ] {
            if list.contains(&0) {
                return invalid(format!(
                    "[train.parallel] {name} entries must be at least 1"
                ));
            }
        }
        Ok(())
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.timeout_s)
    }

    pub fn bucket_bytes(&self) -> usize {
        (self.bucket_mb * 1024.0 * 1024.0) as usize
    }

    /// Splits `batch_size` sequences over `workers` workers: the per-device lists when given
    /// (they must add up to the batch), else `micro_batch` each with the accumulation that makes
    /// the batch.
    pub fn worker_batches(
        &self,
        workers: usize,
        batch_size: usize,
        micro_batch: usize,
    ) -> Result<Vec<WorkerBatch>, ConfigError> {
        let invalid = |why: String| Err(ConfigError::InvalidTrain(why));
        let positive = |x: f64| x.is_finite() && x > 0.0;
        if !positive(self.bucket_mb) || !positive(self.timeout_s) {
            return invalid("[train.parallel] bucket_mb and timeout_s must be positive".into());
        }
        for (name, list) in [
            ("micro_batch", &self.micro_batch),
            ("accumulation", &self.accumulation),
        ] {
            if !list.is_empty() && list.len() != workers {
                return invalid(format!(
                    "[train.parallel] {name} has {} entries but there are {workers} workers (one per device in [train] device, or cpu_workers)",
                    list.len()
                ));
            }
            if list.contains(&0) {
                return invalid(format!(
                    "[train.parallel] {name} entries must be at least 1"
                ));
            }
        }
        let micro: Vec<usize> = if self.micro_batch.is_empty() {
            vec![micro_batch; workers]
        } else {
            self.micro_batch.clone()
        };
        let batches: Vec<WorkerBatch> = if self.accumulation.is_empty() {
            let per_worker = batch_size / workers;
            if per_worker * workers != batch_size
                || micro
                    .iter()
                    .any(|m| !per_worker.is_multiple_of(*m) || per_worker < *m)
            {
                return invalid(format!(
                    "[train] batch_size {batch_size} does not split evenly into {workers} workers \
                     with micro-batches {micro:?}; make batch_size a multiple of {workers} x the \
                     micro-batch, or set [train.parallel] accumulation per device"
                ));
            }
            micro
                .iter()
                .map(|m| WorkerBatch {
                    micro_batch: *m,
                    accumulation: per_worker / m,
                })
                .collect()
        } else {
            micro
                .iter()
                .zip(&self.accumulation)
                .map(|(m, a)| WorkerBatch {
                    micro_batch: *m,
                    accumulation: *a,
                })
                .collect()
        };
        let total: usize = batches.iter().map(WorkerBatch::sequences).sum();
        if total != batch_size {
            return invalid(format!(
                "[train.parallel] micro_batch x accumulation adds up to {total} sequences per \
                 step over the devices, but [train] batch_size is {batch_size}"
            ));
        }
        Ok(batches)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_that_no_device_count_can_fix_are_refused_up_front() {
        ParallelConfig::default().validate().unwrap();
        for (cfg, why) in [
            (
                ParallelConfig {
                    cpu_workers: 0,
                    ..ParallelConfig::default()
                },
                "cpu_workers must be at least 1",
            ),
            (
                ParallelConfig {
                    timeout_s: f64::NAN,
                    ..ParallelConfig::default()
                },
                "timeout_s must be positive",
            ),
            (
                ParallelConfig {
                    accumulation: vec![2, 0],
                    ..ParallelConfig::default()
                },
                "accumulation entries must be at least 1",
            ),
        ] {
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
        }
        let err = toml::from_str::<ParallelConfig>("cpu_worker = 2")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `cpu_worker`"), "{err}");
    }
}
