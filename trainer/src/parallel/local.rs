//! The in-process reducer: workers publish their buckets, each sums its own slice of every
//! bucket (reduce-scatter, in worker order so the result is the same on all), writes the sum
//! into that slice of every bucket (all-gather), and a second barrier ends the call. Works for
//! CPU tensors, and for tensors on several devices (slices are copied across), though GPUs
//! should use NCCL.

use super::BucketReducer;
use crate::error::{Error, Result};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tch::Tensor;

/// Sums buckets among `workers` threads of this process.
#[derive(Debug)]
pub struct LocalReducer {
    workers: usize,
    timeout: Duration,
    shared: Mutex<Shared>,
    changed: Condvar,
}

#[derive(Debug)]
struct Shared {
    generation: u64,
    arrived: Vec<bool>,
    slots: Vec<Option<Tensor>>,
    failed: Option<String>,
}

impl LocalReducer {
    /// A worker that has not arrived at a barrier `timeout` after another did is reported as
    /// crashed or hung, and the call fails on every worker.
    pub fn new(workers: usize, timeout: Duration) -> LocalReducer {
        LocalReducer {
            workers,
            timeout,
            shared: Mutex::new(Shared {
                generation: 0,
                arrived: vec![false; workers],
                slots: (0..workers).map(|_| None).collect(),
                failed: None,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until every worker has arrived; with `publish`, first puts this worker's bucket in
    /// its slot. Returns handles on every slot.
    fn barrier(&self, rank: usize, what: &str, publish: Option<&Tensor>) -> Result<Vec<Tensor>> {
        let mut shared = self.lock();
        if let Some(reason) = &shared.failed {
            return Err(Error::Parallel(reason.clone()));
        }
        if let Some(bucket) = publish {
            shared.slots[rank] = Some(bucket.shallow_clone());
        }
        shared.arrived[rank] = true;
        let generation = shared.generation;
        if shared.arrived.iter().all(|a| *a) {
            shared.generation += 1;
            shared.arrived.fill(false);
            self.changed.notify_all();
        } else {
            let deadline = Instant::now() + self.timeout;
            while shared.generation == generation {
                if let Some(reason) = &shared.failed {
                    return Err(Error::Parallel(reason.clone()));
                }
                let now = Instant::now();
                if now >= deadline {
                    let missing: Vec<String> = shared
                        .arrived
                        .iter()
                        .enumerate()
                        .filter(|(_, a)| !**a)
                        .map(|(i, _)| i.to_string())
                        .collect();
                    let reason = format!(
                        "data-parallel worker {} did not reach the {what} within {:?} of worker \
                         {rank}: it crashed or hangs",
                        missing.join(", "),
                        self.timeout
                    );
                    shared.failed = Some(reason.clone());
                    self.changed.notify_all();
                    return Err(Error::Parallel(reason));
                }
                shared = self
                    .changed
                    .wait_timeout(shared, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        Ok(shared
            .slots
            .iter()
            .map(|slot| {
                slot.as_ref()
                    .map_or_else(Tensor::new, Tensor::shallow_clone)
            })
            .collect())
    }
}

impl BucketReducer for LocalReducer {
    fn all_reduce_sum(&self, rank: usize, bucket: &mut Tensor) -> Result<()> {
        if rank >= self.workers {
            return Err(Error::Parallel(format!(
                "worker {rank} is not one of the reducer's {} workers",
                self.workers
            )));
        }
        if self.workers == 1 {
            return Ok(());
        }
        let slots = self.barrier(rank, "gradient all-reduce", Some(bucket))?;
        let n = bucket.numel() as i64;
        if let Some(bad) = slots
            .iter()
            .position(|s| s.numel() as i64 != n || s.kind() != bucket.kind())
        {
            let reason = format!(
                "data-parallel workers disagree on a gradient bucket: worker {bad} has {} {:?} \
                 values, worker {rank} {n} {:?} (different models or configs)",
                slots[bad].numel(),
                slots[bad].kind(),
                bucket.kind()
            );
            self.abort(reason.clone());
            return Err(Error::Parallel(reason));
        }
        // This worker's slice: sizes differ by at most one value.
        let workers = self.workers as i64;
        let (base, extra) = (n / workers, n % workers);
        let rank_i = rank as i64;
        let start = rank_i * base + rank_i.min(extra);
        let len = base + i64::from(rank_i < extra);
        if len > 0 {
            tch::no_grad(|| {
                let device = bucket.device();
                let mut sum = slots[0].narrow(0, start, len).to_device(device).copy();
                for slot in &slots[1..] {
                    let _ = sum.g_add_(&slot.narrow(0, start, len).to_device(device));
                }
                for slot in &slots {
                    slot.narrow(0, start, len).copy_(&sum);
                }
            });
        }
        drop(slots);
        self.barrier(rank, "end of the gradient all-reduce", None)?;
        Ok(())
    }

    fn abort(&self, reason: String) {
        let mut shared = self.lock();
        if shared.failed.is_none() {
            shared.failed = Some(reason);
        }
        self.changed.notify_all();
    }

    fn workers(&self) -> usize {
        self.workers
    }
}
