//! Data parallelism inside a node: one worker per local device (or several CPU workers), each
//! with a replica of the model, its own micro-batches and its own optimizer. Gradients are summed
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

pub use forge_protocol::run_config::{GradDtype, ParallelConfig, WorkerBatch};
pub use local::LocalReducer;
#[cfg(feature = "nccl")]
pub use nccl::{NcclReducer, cuda_total_memory};
pub use worker::Fault;

use crate::error::{Error, Result};
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

/// The tensor kind of a [`GradDtype`].
fn grad_kind(dtype: GradDtype) -> Kind {
    match dtype {
        GradDtype::Fp32 => Kind::Float,
        GradDtype::Bf16 => Kind::BFloat16,
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
    let kind = grad_kind(dtype);
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
