//! Data parallelism inside a node: one worker per local device (or several CPU workers), each
//! with a replica of the model, its own micro-batches and its own AdamW. Gradients are summed
//! every step (each worker weights its own by its share of the batch first), so every worker's
//! optimizer takes the same step and the replicas stay identical; parameters are copied from
//! worker 0 at the start and after every DiLoCo outer step.
//!
//! Workers are threads of the node's one process, not processes: the node keeps a single
//! coordinator session, peer-to-peer identity and DiLoCo outer state, tensors move between
//! workers without serialisation, and libtorch kernels release no lock the others need. Worker 0
//! runs on the caller's thread; the others each own a thread (see [`worker`]). A worker that
//! fails or panics aborts the reducer, and one that hangs is found by the reducer's timeout, so
//! a step ends with an error naming the worker instead of waiting forever.
//!
//! The gradient exchange is a [`BucketReducer`]: [`LocalReducer`] sums in memory (CPU workers,
//! and any devices as a fallback); the `nccl` feature adds NCCL for GPUs. Both see the same
//! flattened buckets ([`all_reduce_gradients`]).

mod local;
#[cfg(feature = "nccl")]
mod nccl;
pub(crate) mod worker;

pub use local::LocalReducer;
#[cfg(feature = "nccl")]
pub use nccl::NcclReducer;
pub use worker::Fault;

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

/// Sums one flat gradient bucket across the workers of a node. Every worker calls it with a
/// bucket of the same length and kind, buckets in the same order.
pub trait BucketReducer: Send + Sync {
    /// Replaces `bucket` on worker `rank` with the sum over all workers, the same on each.
    fn all_reduce_sum(&self, rank: usize, bucket: &mut Tensor) -> Result<()>;

    /// Makes every waiting and later call fail with `reason` (a worker failed or panicked).
    fn abort(&self, reason: String);

    /// Workers taking part.
    fn workers(&self) -> usize;
}

/// The kind gradients travel in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GradDtype {
    #[default]
    Fp32,
    Bf16,
}

impl GradDtype {
    fn kind(self) -> Kind {
        match self {
            GradDtype::Fp32 => Kind::Float,
            GradDtype::Bf16 => Kind::BFloat16,
        }
    }
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
    ) -> Result<Vec<WorkerBatch>> {
        let invalid = |why: String| Err(Error::InvalidTrainConfig(why));
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
                || micro.iter().any(|m| per_worker % m != 0 || per_worker < *m)
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

/// Sums `grads` across workers through `reducer`, in flat buckets of at most `bucket_bytes` in
/// `dtype`; returns the time spent (the communication share of a step). Every worker calls it
/// with gradients of the same shapes, in the same order.
pub fn all_reduce_gradients(
    reducer: &dyn BucketReducer,
    rank: usize,
    grads: &mut [Tensor],
    bucket_bytes: usize,
    dtype: GradDtype,
) -> Result<Duration> {
    let started = Instant::now();
    let kind = dtype.kind();
    let elem = kind.elt_size_in_bytes();
    if let Some(i) = grads.iter().position(|g| !g.defined()) {
        return Err(Error::Parallel(format!(
            "worker {rank}: gradient {i} is undefined; every parameter must take part in the loss"
        )));
    }
    tch::no_grad(|| {
        let mut start = 0;
        while start < grads.len() {
            let mut end = start + 1;
            let mut bytes = grads[start].numel() * elem;
            while end < grads.len() && bytes + grads[end].numel() * elem <= bucket_bytes {
                bytes += grads[end].numel() * elem;
                end += 1;
            }
            let group = &mut grads[start..end];
            let parts: Vec<Tensor> = group
                .iter()
                .map(|g| g.reshape([-1]).to_kind(kind))
                .collect();
            let mut flat = Tensor::cat(&parts, 0);
            drop(parts);
            reducer.all_reduce_sum(rank, &mut flat)?;
            let mut offset = 0i64;
            for g in group.iter_mut() {
                let n = g.numel() as i64;
                let part = flat.narrow(0, offset, n).view_as(g);
                g.copy_(&part);
                offset += n;
            }
            start = end;
        }
        Ok(started.elapsed())
    })
}

#[cfg(test)]
mod tests;
