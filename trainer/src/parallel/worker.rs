//! A data-parallel worker: one model replica, its optimizer and its micro-batches on one device.
//! Worker 0 lives in the [`crate::train::Trainer`] and steps on the caller's thread; every other
//! worker owns a thread ([`WorkerThread`]) that takes commands and answers each one.

use super::{BucketReducer, GradDtype, WorkerBatch, all_reduce_gradients};
use crate::data::{Batch, Batches, DataPosition, LeaseShare};
use crate::error::{Error, Result};
use crate::models::{Model, cross_entropy, trainable_by_name};
use crate::optim::{Optimizer, accumulate, clip_grad_norm};
use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};
use tch::{Device, Tensor, nn::VarStore};

/// How a worker exchanges gradients with the others.
#[derive(Clone)]
pub(crate) struct Exchange {
    pub(crate) reducer: Arc<dyn BucketReducer>,
    pub(crate) bucket_bytes: usize,
    pub(crate) dtype: GradDtype,
}

pub(crate) struct Worker {
    pub(crate) rank: usize,
    pub(crate) device: Device,
    pub(crate) vs: VarStore,
    pub(crate) model: Model,
    pub(crate) opt: Optimizer,
    pub(crate) batches: Batches,
    pub(crate) batch: WorkerBatch,
    /// This worker's sequences over the node's whole batch: its gradients' weight in the sum.
    pub(crate) share: f64,
    /// Recompute each block's activations in backward (`[train] activation_checkpointing`).
    pub(crate) recompute: bool,
}

/// What one worker's part of a step did.
#[derive(Debug, Clone, Default)]
pub(crate) struct StepOutput {
    /// This worker's mean loss times its share (the node's loss is the sum over workers).
    pub(crate) weighted_loss: f64,
    /// Norm of the summed gradients before clipping (the same on every worker).
    pub(crate) grad_norm: f64,
    /// Where this worker's part of the step went.
    pub(crate) parts: StepParts,
    /// With a data mixture: the windows this worker read of each source in the step.
    pub(crate) source_windows: Vec<u64>,
}

/// A step's time by part (one worker's clock).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct StepParts {
    /// Taking the micro-batches from the data stream and onto the device.
    pub(crate) data: Duration,
    /// Forward and backward passes and gradient accumulation (up to the last loss read back).
    pub(crate) forward_backward: Duration,
    /// The gradient exchange among the node's data-parallel workers.
    pub(crate) exchange: Duration,
    /// Clipping and the optimizer step (on a GPU, until its kernels finished).
    pub(crate) optimizer: Duration,
}

/// Adds the time since `since` to a part of the step; returns now, where the next part starts.
pub(crate) trait Lap {
    fn lap(&mut self, since: Instant) -> Instant;
}

impl Lap for Duration {
    fn lap(&mut self, since: Instant) -> Instant {
        let now = Instant::now();
        *self += now.duration_since(since);
        now
    }
}

impl Worker {
    pub(crate) fn to_tensors(&self, batch: &Batch) -> (Tensor, Tensor) {
        let shape = [batch.rows as i64, batch.seq_len as i64];
        (
            Tensor::from_slice(&batch.inputs)
                .view(shape)
                .to_device(self.device),
            Tensor::from_slice(&batch.targets)
                .view(shape)
                .to_device(self.device),
        )
    }

    /// The time of this worker's forward and backward passes for one step, on made-up tokens
    /// and without touching its parameters, optimizer or data position: a speed measurement
    /// that leaves the run's state as it was.
    pub(crate) fn probe(&self, seq_len: usize) -> Result<Duration> {
        let vocab = self.model.config().vocab_size.max(1);
        let rows = self.batch.micro_batch;
        let ids: Vec<i64> = (0..(rows * (seq_len + 1)) as i64)
            .map(|i| (i * 7919) % vocab)
            .collect();
        let mut batch = Batch {
            inputs: Vec::with_capacity(rows * seq_len),
            targets: Vec::with_capacity(rows * seq_len),
            rows,
            seq_len,
        };
        for row in ids.chunks_exact(seq_len + 1) {
            batch.inputs.extend_from_slice(&row[..seq_len]);
            batch.targets.extend_from_slice(&row[1..]);
        }
        let started = std::time::Instant::now();
        for _ in 0..self.batch.accumulation {
            let (ids, tgt) = self.to_tensors(&batch);
            // A pipeline stage's part: from the previous stage's output, to its own.
            let input = match self.model.takes_ids() {
                true => ids,
                false => Tensor::zeros(
                    [rows as i64, seq_len as i64, self.model.config().d_model],
                    (tch::Kind::Float, self.device),
                ),
            };
            let out = self.model.forward(&input);
            let loss = match self.model.gives_logits() {
                true => cross_entropy(&out, &tgt),
                false => out.mean(tch::Kind::Float),
            };
            let grads = self.opt.gradients(&loss);
            drop(grads);
            f64::try_from(&loss).map_err(Error::torch("reading the loss"))?;
        }
        Ok(started.elapsed())
    }

    /// Forward and backward over this worker's micro-batches, the gradient exchange, clipping
    /// and the optimizer step at `lr`.
    pub(crate) fn step(
        &mut self,
        lr: f64,
        grad_clip: f64,
        exchange: Option<&Exchange>,
    ) -> Result<StepOutput> {
        let accum = self.batch.accumulation;
        let mut grads: Vec<Tensor> = Vec::new();
        let mut loss_sum = 0.0;
        let mut parts = StepParts::default();
        for _ in 0..accum {
            let clock = Instant::now();
            let batch = self.batches.next_batch();
            let (ids, tgt) = self.to_tensors(&batch);
            let clock = parts.data.lap(clock);
            let scale = self.share / accum as f64;
            let (loss, micro) = if self.recompute {
                let params = self.opt.parameters();
                self.model.recomputed_gradients(&params, &ids, &tgt, scale)
            } else {
                let loss = cross_entropy(&self.model.forward(&ids), &tgt) * scale;
                let grads = self.opt.gradients(&loss);
                (loss, grads)
            };
            if grads.is_empty() {
                grads = micro;
            } else {
                accumulate(&mut grads, micro);
            }
            loss_sum += f64::try_from(&loss).map_err(Error::torch("reading the loss"))?;
            parts.forward_backward.lap(clock);
        }
        parts.exchange = match exchange {
            Some(x) => all_reduce_gradients(
                x.reducer.as_ref(),
                self.rank,
                &mut grads,
                x.bucket_bytes,
                x.dtype,
            )?,
            None => Duration::ZERO,
        };
        let clock = Instant::now();
        let grad_norm = clip_grad_norm(&grads, grad_clip);
        self.opt.step(lr, &grads);
        if let Device::Cuda(index) = self.device {
            // The optimizer's kernels are queued: wait for them so that their time is theirs
            // and not the next step's.
            tch::Cuda::synchronize(index as i64);
        }
        parts.optimizer.lap(clock);
        let source_windows = self.batches.take_source_windows();
        Ok(StepOutput {
            weighted_loss: loss_sum,
            grad_norm,
            parts,
            source_windows,
        })
    }

    /// Copies of this worker's parameters for a worker on `device`.
    pub(crate) fn params_for(&self, device: Device) -> Vec<Tensor> {
        tch::no_grad(|| {
            trainable_by_name(&self.vs)
                .into_iter()
                .map(|(_, p)| p.to_device(device).copy())
                .collect()
        })
    }

    /// Copies of this worker's optimizer state for a worker on `device`.
    pub(crate) fn optimizer_for(&self, device: Device) -> HashMap<String, Tensor> {
        tch::no_grad(|| {
            self.opt
                .state_tensors()
                .into_iter()
                .map(|(name, t)| (name, t.to_device(device).copy()))
                .collect()
        })
    }

    fn load_params(&mut self, params: &[Tensor]) -> Result<()> {
        let mine = trainable_by_name(&self.vs);
        if mine.len() != params.len() {
            return Err(Error::Parallel(format!(
                "worker {} has {} parameters but was sent {}",
                self.rank,
                mine.len(),
                params.len()
            )));
        }
        tch::no_grad(|| {
            for ((_, mut p), src) in mine.into_iter().zip(params) {
                p.copy_(src);
            }
        });
        Ok(())
    }

    fn handle(&mut self, command: Command, exchange: &Exchange) -> Result<Reply> {
        match command {
            Command::Step {
                lr,
                grad_clip,
                fault,
            } => {
                match fault {
                    Some(Fault::Panic) => panic!("injected fault in worker {}", self.rank),
                    Some(Fault::Hang(pause)) => std::thread::sleep(pause),
                    None => {}
                }
                let out = self.step(lr, grad_clip, Some(exchange))?;
                Ok(Reply::Stepped(out, self.batches.position()))
            }
            Command::LoadParams(params) => {
                self.load_params(&params)?;
                Ok(Reply::Done(self.batches.position()))
            }
            Command::LoadOptimizer(state) => {
                self.opt.load_state_tensors(&state)?;
                Ok(Reply::Done(self.batches.position()))
            }
            Command::SetShard { index, count } => {
                self.batches.reshard(index, count)?;
                Ok(Reply::Done(self.batches.position()))
            }
            Command::Lease(share) => {
                self.batches.lease(share)?;
                Ok(Reply::Done(self.batches.position()))
            }
            Command::Seek(position) => {
                self.batches.seek(position)?;
                Ok(Reply::Done(self.batches.position()))
            }
        }
    }
}

/// A fault to inject into a worker's next step (fault-tolerance tests and chaos runs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// The worker panics, as on a failed CUDA call.
    Panic,
    /// The worker stops for this long, as on a hung collective or kernel.
    Hang(Duration),
}

pub(crate) enum Command {
    Step {
        lr: f64,
        grad_clip: f64,
        fault: Option<Fault>,
    },
    LoadParams(Vec<Tensor>),
    LoadOptimizer(HashMap<String, Tensor>),
    SetShard {
        index: usize,
        count: usize,
    },
    Seek(DataPosition),
    Lease(LeaseShare),
}

pub(crate) enum Reply {
    Stepped(StepOutput, DataPosition),
    Done(DataPosition),
}

/// A worker on its own thread.
pub(crate) struct WorkerThread {
    pub(crate) rank: usize,
    pub(crate) device: Device,
    commands: Sender<Command>,
    replies: Receiver<Result<Reply>>,
}

impl std::fmt::Debug for WorkerThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerThread")
            .field("rank", &self.rank)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl WorkerThread {
    pub(crate) fn spawn(mut worker: Worker, exchange: Exchange) -> Result<WorkerThread> {
        let (commands, inbox) = mpsc::channel::<Command>();
        let (outbox, replies) = mpsc::channel();
        let (rank, device) = (worker.rank, worker.device);
        std::thread::Builder::new()
            .name(format!("forge-worker-{rank}"))
            .spawn(move || {
                while let Ok(command) = inbox.recv() {
                    let reply =
                        catch_unwind(AssertUnwindSafe(|| worker.handle(command, &exchange)));
                    let (reply, fatal) = match reply {
                        Ok(reply) => (reply, false),
                        Err(panic) => {
                            let what = panic
                                .downcast_ref::<String>()
                                .cloned()
                                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                                .unwrap_or_else(|| "unknown panic".to_string());
                            (
                                Err(Error::Parallel(format!(
                                    "data-parallel worker {rank} panicked: {what}"
                                ))),
                                true,
                            )
                        }
                    };
                    if let Err(e) = &reply {
                        exchange.reducer.abort(e.to_string());
                    }
                    if outbox.send(reply).is_err() || fatal {
                        return;
                    }
                }
            })
            .map_err(|e| Error::Parallel(format!("starting worker thread {rank}: {e}")))?;
        Ok(WorkerThread {
            rank,
            device,
            commands,
            replies,
        })
    }

    pub(crate) fn send(&self, command: Command) -> Result<()> {
        self.commands.send(command).map_err(|_| self.gone())
    }

    /// The answer to the last command, or an error naming this worker after `timeout`.
    pub(crate) fn wait(&self, timeout: Duration, what: &str) -> Result<Reply> {
        match self.replies.recv_timeout(timeout) {
            Ok(reply) => reply,
            Err(RecvTimeoutError::Timeout) => Err(Error::Parallel(format!(
                "data-parallel worker {} ({:?}) did not finish {what} within {timeout:?}: it hangs",
                self.rank, self.device
            ))),
            Err(RecvTimeoutError::Disconnected) => Err(self.gone()),
        }
    }

    fn gone(&self) -> Error {
        Error::Parallel(format!(
            "data-parallel worker {} ({:?}) has stopped after an earlier failure",
            self.rank, self.device
        ))
    }
}
