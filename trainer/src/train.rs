//! Single-node training: the loop that `forge-node train` runs, and that every DiLoCo node
//! runs between outer steps. Gradient accumulation, clipping, scheduled AdamW, eval with bits
//! per byte and a sample, atomic checkpoints with exact resume, a divergence guard, and a clean
//! stop on Ctrl-C.

use crate::checkpoint::CheckpointDir;
use crate::config::RunConfig;
use crate::control::{Answer, Inbox, RunControl};
use crate::data::{Batch, Batches, DataPosition, Dataset, EvalBatches, LeaseShare};
use crate::device::{device_name, parse_devices};
use crate::error::{Error, Result};
use crate::flops;
use crate::metrics::{MetricsLog, Phases, StepMetrics};
use crate::models::{Initial, Model, ModelConfig, Precision, weights};
use crate::optim::Optimizer;
use crate::parallel::worker::{Command, Exchange, Lap, Reply, StepParts, Worker, WorkerThread};
use crate::parallel::{BucketReducer, Fault, LocalReducer};
use crate::pipeline::{ScheduleConfig, StageLink, StageRunner, check_stage};
use crate::sample::generate;
use crate::schedule::scaled_peak_lr;
use forge_protocol::messages::{Digest, LayerRange};
use forge_protocol::model::hf;
use forge_protocol::pipeline::StageDtype;
use forge_protocol::run_config::Anneal;
use forge_protocol::session::ControlAction;
use forge_protocol::stream::{DataDigest, SeqRange};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;
use tch::{Device, Tensor, nn::VarStore};

/// Gives the calling thread the lowest CPU priority (nice 19), where the platform allows: the
/// background checkpoint writer hashes and copies gigabytes, and on a machine whose cores all
/// run the step's parallel kernels a thread competing at equal priority stalls every kernel
/// (each waits for the worker the writer displaced). At nice 19 it runs in the gaps.
#[allow(unsafe_code)]
fn lowest_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and setpriority take no pointers; PRIO_PROCESS with a thread id sets that
    // thread's nice value on Linux. A failure leaves the priority as it was.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 19);
    }
}

/// A checkpoint's contents as the trainer hands them to the writer.
struct CheckpointSnapshot {
    model: std::collections::BTreeMap<String, Tensor>,
    optimizer: Vec<(String, Tensor)>,
    state: TrainState,
    tokenizer: String,
    /// The `tokenizer_config.json` that keeps the tokenizer's special tokens, where they are
    /// not `<|endoftext|>` ([`crate::data::Tokenizer::specials_json`]).
    tokenizer_specials: Option<String>,
    /// Held while the snapshot lives when its tensors are the trainer's page-locked staging
    /// buffers: the next snapshot reuses them only once this is dropped.
    _staging: Option<Arc<()>>,
}

/// Page-locked (pinned) host buffers that snapshots of GPU tensors are copied into, kept from
/// one checkpoint to the next as PyTorch's asynchronous checkpointing keeps its staging cache:
/// a device-to-host copy into pinned memory runs at the link's full speed, and allocating a
/// gigabyte of it for every save would cost more than the copy.
#[derive(Default)]
struct Staging {
    buffers: Vec<Tensor>,
    /// One clone per snapshot that still uses `buffers`.
    lease: Arc<()>,
}

impl Staging {
    /// Host copies of `sources` (each converted to its kind), in memory pinned for `device`
    /// (plain host memory for None): into the cached buffers
    /// when no writer still holds them and the shapes match, else into new pinned buffers that
    /// become the cache. Returns the copies and the lease the snapshot keeps.
    fn copy(
        &mut self,
        device: Option<Device>,
        sources: &[(Tensor, tch::Kind)],
    ) -> (Vec<Tensor>, Arc<()>) {
        let fits = Arc::strong_count(&self.lease) == 1
            && self.buffers.len() == sources.len()
            && self
                .buffers
                .iter()
                .zip(sources)
                .all(|(b, (t, kind))| b.size() == t.size() && b.kind() == *kind);
        if !fits {
            self.buffers = sources
                .iter()
                .map(|(t, kind)| {
                    let buffer = Tensor::empty(t.size(), (*kind, Device::Cpu));
                    match device {
                        Some(device) => buffer.pin_memory(device),
                        None => buffer,
                    }
                })
                .collect();
            self.lease = Arc::new(());
        }
        let copies = self
            .buffers
            .iter_mut()
            .zip(sources)
            .map(|(buffer, (t, kind))| {
                buffer.copy_(&t.detach().to_kind(*kind));
                buffer.shallow_clone()
            })
            .collect();
        (copies, self.lease.clone())
    }
}

impl CheckpointSnapshot {
    /// Writes the trainer's files into the (temporary) checkpoint directory `dir`; `halfway`
    /// runs after the model file (a test holds the write there).
    fn write(&self, dir: &Path, halfway: impl FnOnce()) -> Result<()> {
        let failed = |what: &str, e: &dyn std::fmt::Display| Error::Checkpoint {
            path: dir.to_path_buf(),
            why: format!(
                "writing {what} failed: {e}. If the disk is full, free space and resume; the \
                 previous checkpoint is intact"
            ),
        };
        weights::save_named(&self.model, &dir.join("model.safetensors"))
            .map_err(|e| failed("model.safetensors", &e))?;
        halfway();
        Tensor::write_safetensors(&self.optimizer, dir.join("optimizer.safetensors"))
            .map_err(|e| failed("optimizer.safetensors", &e))?;
        write_json(&dir.join("state.json"), &self.state).map_err(|e| failed("state.json", &e))?;
        std::fs::write(dir.join(hf::TOKENIZER), &self.tokenizer)
            .map_err(|e| failed(hf::TOKENIZER, &e))?;
        if let Some(specials) = &self.tokenizer_specials {
            std::fs::write(dir.join(hf::TOKENIZER_CONFIG), specials)
                .map_err(|e| failed(hf::TOKENIZER_CONFIG, &e))?;
        }
        Ok(())
    }
}

/// Everything besides tensors that a checkpoint must restore for an exact resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainState {
    pub step: u64,
    pub tokens: u64,
    pub data_position: DataPosition,
    pub loss_ema: Option<f64>,
    pub elapsed_s: f64,
    pub model: ModelConfig,
    /// The run config as TOML, so a checkpoint says how it was made.
    pub run_config: String,
    pub forge_version: String,
    /// Data positions of data-parallel workers 1.. (worker 0's is `data_position`).
    #[serde(default)]
    pub worker_positions: Vec<DataPosition>,
    /// What the operator changed of the run (`forge-node control`), kept so that a resumed
    /// run keeps it.
    #[serde(default)]
    pub control: RunControl,
    /// With a `[data] mix`: the windows this run's steps read of each source, in mix order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_windows: Vec<u64>,
}

/// Adds `more` to `counts` element by element (`counts` grows to `more`'s length).
fn add_counts(counts: &mut Vec<u64>, more: &[u64]) {
    if counts.len() < more.len() {
        counts.resize(more.len(), 0);
    }
    for (c, m) in counts.iter_mut().zip(more) {
        *c += m;
    }
}

/// How a run ended (errors are returned as `Err`).
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The budget was reached.
    Finished { step: u64, checkpoint: PathBuf },
    /// A stop was requested (SIGINT/SIGTERM); a checkpoint was saved.
    Interrupted { step: u64, checkpoint: PathBuf },
    /// `forge-node control abort`: the run ended without saving.
    Aborted { step: u64 },
}

/// Told after every inner step: the loop's progress so far and the steps it was asked for (a
/// terminal's progress line).
pub type StepObserver = Box<dyn FnMut(&InnerSummary, u64) + Send>;

/// What an inner loop did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct InnerSummary {
    pub steps: u64,
    pub tokens: u64,
    pub loss_sum: f64,
    pub last_loss: f64,
    pub last_grad_norm: f64,
    /// The learning rate of the last step.
    pub last_lr: f64,
    pub seconds: f64,
}

impl InnerSummary {
    /// Counts `later`'s steps in this summary, as one span of steps.
    pub fn absorb(&mut self, later: &InnerSummary) {
        self.steps += later.steps;
        self.tokens += later.tokens;
        self.loss_sum += later.loss_sum;
        self.seconds += later.seconds;
        if later.steps > 0 {
            self.last_loss = later.last_loss;
            self.last_grad_norm = later.last_grad_norm;
            self.last_lr = later.last_lr;
        }
    }

    pub fn mean_loss(&self) -> f64 {
        if self.steps == 0 {
            f64::NAN
        } else {
            self.loss_sum / self.steps as f64
        }
    }
}

/// Summary a caller can print.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub outcome: Outcome,
    pub final_eval_loss: Option<f64>,
    pub final_eval_bpb: Option<f64>,
    pub sample: Option<String>,
    pub out_dir: PathBuf,
}

/// Where the time of this process's optimizer steps went.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepTiming {
    pub steps: u64,
    pub step_s: f64,
    /// Of `step_s`, worker 0's time taking micro-batches from the data stream onto the device.
    pub data_s: f64,
    /// Worker 0's forward and backward passes (a pipeline stage's: the micro-batch schedule,
    /// with the activations' transfers and the waits for the other stages).
    pub forward_backward_s: f64,
    /// Worker 0's time in the gradient exchange among data-parallel workers (0 with one).
    pub comm_s: f64,
    /// Worker 0's clipping and optimizer step (a stage's: with the exchange of the norm).
    pub optimizer_s: f64,
}

impl StepTiming {
    /// Counts a step that began at `started`, with worker 0's `parts`.
    fn add(&mut self, started: Instant, parts: StepParts) {
        self.steps += 1;
        self.step_s += started.elapsed().as_secs_f64();
        self.data_s += parts.data.as_secs_f64();
        self.forward_backward_s += parts.forward_backward.as_secs_f64();
        self.comm_s += parts.exchange.as_secs_f64();
        self.optimizer_s += parts.optimizer.as_secs_f64();
    }

    /// The time since `earlier`, this trainer's timing then (none if `earlier` counts more
    /// steps: another trainer's, as after a node rebuilt its trainer).
    pub fn since(&self, earlier: &StepTiming) -> StepTiming {
        match self.steps.checked_sub(earlier.steps) {
            Some(steps) => StepTiming {
                steps,
                step_s: self.step_s - earlier.step_s,
                data_s: self.data_s - earlier.data_s,
                forward_backward_s: self.forward_backward_s - earlier.forward_backward_s,
                comm_s: self.comm_s - earlier.comm_s,
                optimizer_s: self.optimizer_s - earlier.optimizer_s,
            },
            None => StepTiming::default(),
        }
    }

    /// Adds `more` (another span's timing) to this one.
    pub fn accumulate(&mut self, more: &StepTiming) {
        self.steps += more.steps;
        self.step_s += more.step_s;
        self.data_s += more.data_s;
        self.forward_backward_s += more.forward_backward_s;
        self.comm_s += more.comm_s;
        self.optimizer_s += more.optimizer_s;
    }

    /// The gradient exchange's share of step time.
    pub fn comm_fraction(&self) -> f64 {
        if self.step_s > 0.0 {
            self.comm_s / self.step_s
        } else {
            0.0
        }
    }
}

/// Where a round's inner steps sit on the lr schedule: step `i` of the round at
/// `start + i * per_step`. A node doing more steps than H in a round (a fast node in a paced
/// round) moves through the round's H schedule steps in smaller strides.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScheduleSpan {
    pub start: u64,
    pub per_step: f64,
}

/// The pipeline stage a trainer holds: planner layers `layers`, stage `stage` of `stages`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageSpec {
    pub layers: LayerRange,
    pub stage: u32,
    pub stages: u32,
}

/// A trainer's part of a pipeline: the schedule and the link to the other stages (set once
/// they are known: [`Trainer::set_stage_link`]).
struct Pipeline {
    spec: StageSpec,
    runner: StageRunner,
    link: Option<Box<dyn StageLink>>,
    wire: StageDtype,
    /// Whether every stage wanted another step after the last one.
    more: bool,
}

/// A run being trained.
pub struct Trainer {
    cfg: RunConfig,
    device: Device,
    dataset: Dataset,
    /// Data-parallel worker 0: the model that is evaluated, sampled and checkpointed.
    primary: Worker,
    /// Workers 1.., each on its own thread.
    others: Vec<WorkerThread>,
    exchange: Option<Exchange>,
    timing: StepTiming,
    /// Why data parallelism broke down, if it did: no step can be taken after that.
    failed: Option<String>,
    /// A fault for a worker's next step (see [`Trainer::inject_fault`]).
    fault: Option<(usize, Fault)>,
    eval_set: Vec<Batch>,
    eval_bytes_per_token: f64,
    ckpts: CheckpointDir,
    /// The checkpoint this trainer last wrote or resumed from (verified then), which a
    /// divergence message names: the step path never reads checkpoint files.
    last_checkpoint: std::sync::Mutex<Option<PathBuf>>,
    /// The checkpoint being written in the background ([`Trainer::save_checkpoint_async`]).
    writing: std::sync::Mutex<Option<std::thread::JoinHandle<Result<PathBuf>>>>,
    /// Pinned host buffers for snapshots of a GPU trainer's state.
    staging: std::sync::Mutex<Staging>,
    /// Background writes of checkpoints of this step or later stop halfway until it is raised
    /// ([`Trainer::hold_checkpoint_writes`]); `u64::MAX`: none.
    hold_writes: Arc<AtomicU64>,
    state: TrainState,
    peak_lr: f64,
    peak_tflops: Option<f64>,
    /// Set when this trainer holds one stage of a pipeline. Behind a lock so that evaluation,
    /// which talks to the other stages, keeps `&self`.
    pipeline: Option<std::sync::Mutex<Pipeline>>,
    /// Told after every inner step ([`Trainer::observe_steps`]).
    observer: Option<StepObserver>,
    /// Where `forge-node control` requests reach [`Trainer::run`] ([`Trainer::take_control`]).
    control: Option<Inbox>,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("out_dir", &self.cfg.train.out_dir)
            .field("step", &self.state.step)
            .finish()
    }
}

impl Trainer {
    /// Prepares data, builds the model and optimizer, and resumes from the newest valid
    /// checkpoint in the run directory when `[checkpoint] resume` is on.
    pub fn new(cfg: RunConfig) -> Result<Self> {
        Trainer::with_stage(cfg, None)
    }

    /// [`Trainer::new`] for one stage of a pipeline (`None`: the whole model): the model holds
    /// only the stage's layers (with the whole model's initial values), and a step runs the
    /// pipeline's schedule once [`Trainer::set_stage_link`] has joined the other stages.
    pub fn with_stage(mut cfg: RunConfig, stage: Option<StageSpec>) -> Result<Self> {
        crate::import::read_init(&mut cfg, Path::new("the run config"))?;
        let t = &cfg.train;
        let mut devices = parse_devices(&t.device)?;
        if t.parallel.cpu_workers == 0 {
            return Err(Error::InvalidTrainConfig(
                "[train.parallel] cpu_workers must be at least 1".into(),
            ));
        }
        if t.parallel.cpu_workers > 1 {
            if devices != [Device::Cpu] {
                return Err(Error::InvalidTrainConfig(format!(
                    "[train.parallel] cpu_workers = {} needs device = \"cpu\", not \"{}\"",
                    t.parallel.cpu_workers, t.device
                )));
            }
            devices = vec![Device::Cpu; t.parallel.cpu_workers];
        }
        if stage.is_some() && devices.len() > 1 {
            return Err(Error::InvalidTrainConfig(format!(
                "a pipeline stage trains on one device; this node has {} (device = \"{}\", \
                 cpu_workers = {}): give it one",
                devices.len(),
                t.device,
                t.parallel.cpu_workers
            )));
        }
        let worker_batches =
            t.parallel
                .worker_batches(devices.len(), t.batch_size, t.micro_batch)?;
        let device = devices[0];
        let precision = t.precision.unwrap_or(match device {
            Device::Cpu => Precision::Fp32,
            _ => Precision::Bf16,
        });
        if precision == Precision::Bf16 && device == Device::Cpu {
            return Err(Error::InvalidTrainConfig(
                "precision bf16 is for CUDA devices; use fp32 (or bf16-pure, which keeps the \
                 parameters and optimizer state in bf16) on cpu"
                    .into(),
            ));
        }
        if precision == Precision::Bf16Pure && stage.is_some() {
            return Err(Error::InvalidTrainConfig(
                "precision bf16-pure is not supported for pipeline stages yet; use fp32 or bf16 \
                 for a model split over nodes"
                    .into(),
            ));
        }
        if let Some(n) = t.threads {
            tch::set_num_threads(n);
        }
        let out_dir = t.out_dir.clone();
        std::fs::create_dir_all(&out_dir).map_err(Error::io(format!(
            "creating the run directory {}",
            out_dir.display()
        )))?;
        let dataset = Dataset::prepare(&cfg.data)?;

        let mut model_cfg = cfg.model_config()?;
        let vocab = dataset.tokenizer.vocab_size() as i64;
        match (&cfg.init, cfg.model.vocab_size) {
            (Some(init), _) if model_cfg.vocab_size < vocab => {
                return Err(Error::InitFrom {
                    dir: init.dir.clone(),
                    why: format!(
                        "the tokenizer {} has ids up to {}, but the model's embedding has {} \
                         rows (config.json vocab_size): it is not this model's tokenizer; leave \
                         [data] tokenizer out to use the folder's",
                        dataset.tokenizer_origin.path().display(),
                        vocab - 1,
                        model_cfg.vocab_size
                    ),
                });
            }
            (Some(_), _) => {}
            (None, Some(v)) if v < vocab => {
                return Err(Error::InvalidTrainConfig(format!(
                    "[model] vocab_size {v} is smaller than the tokenizer's {vocab} tokens"
                )));
            }
            (None, Some(_)) => {}
            (None, None) => model_cfg.vocab_size = vocab,
        }
        model_cfg.validate()?;

        let ckpts = CheckpointDir::new(out_dir.join("checkpoints"), cfg.checkpoint.keep);
        let resume = if cfg.checkpoint.resume {
            ckpts.latest_valid().map(|(_, dir)| dir)
        } else {
            None
        };
        // A run resumed from its checkpoint takes its parameters from there, never from the
        // folder again.
        let init = cfg.init.as_ref().filter(|_| resume.is_none());
        if let Some(init) = init {
            if let Some(pinned) = &cfg.model.init_sha256 {
                crate::import::check_pinned(init, pinned)?;
            }
            for note in &init.model.notes {
                tracing::warn!("[model] init_from {}: {note}", init.dir.display());
            }
        }
        let load = |cpu: &mut VarStore| match init {
            Some(init) => crate::import::load_weights(cpu, &model_cfg, &init.dir),
            None => Ok(()),
        };
        let initial = match init {
            Some(_) => Initial::Load(&load),
            None => Initial::Seed(t.seed),
        };

        let mut workers = Vec::with_capacity(devices.len());
        for (rank, (dev, batch)) in devices.iter().zip(&worker_batches).enumerate() {
            let mut vs = VarStore::new(*dev);
            // Worker 0 holds the run's initial parameters (the same on every device and node);
            // the others get them from it by the broadcast below.
            let mut model = if let Some(spec) = stage {
                check_stage(&model_cfg, spec.layers, spec.stage, spec.stages)?;
                Model::initial_stage(&mut vs, &model_cfg, &initial, spec.layers)?
            } else if rank == 0 {
                let whole = LayerRange::whole(model_cfg.n_layer as u32);
                Model::initial_stage(&mut vs, &model_cfg, &initial, whole)?
            } else {
                let _rng = crate::rng();
                Model::new(&vs.root(), &model_cfg)?
            };
            model.set_precision(precision);
            if precision == Precision::Bf16Pure {
                // Parameters (and so gradients and optimizer state) in bf16.
                vs.bfloat16();
            }
            let opt = Optimizer::new(&vs, &t.optimizer, t.adamw);
            let batches = Batches::new(
                dataset.train_stream(),
                t.seq_len as usize,
                batch.micro_batch,
                t.seed,
                rank,
                devices.len(),
            )?;
            workers.push(Worker {
                rank,
                device: *dev,
                vs,
                model,
                opt,
                batches,
                batch: *batch,
                share: batch.sequences() as f64 / t.batch_size as f64,
                // A pipeline stage's steps run the pipeline's schedule, not this path.
                recompute: t.activation_checkpointing && stage.is_none(),
            });
        }
        let exchange = if workers.len() > 1 {
            Some(Exchange {
                reducer: gradient_reducer(&devices, t.parallel.timeout())?,
                bucket_bytes: t.parallel.bucket_bytes(),
                dtype: t.parallel.grad_dtype,
            })
        } else {
            None
        };
        let mut workers = workers.into_iter();
        let primary = workers.next().expect("at least one device");
        let others = match &exchange {
            Some(exchange) => workers
                .map(|w| WorkerThread::spawn(w, exchange.clone()))
                .collect::<Result<Vec<_>>>()?,
            None => Vec::new(),
        };
        let max_windows = (cfg.eval.batches > 0).then(|| cfg.eval.batches * t.micro_batch);
        let eval_set: Vec<Batch> = EvalBatches::new(
            dataset.val.tokens().clone(),
            t.seq_len as usize,
            t.micro_batch,
            max_windows,
        )?
        .collect();
        let eval_bytes_per_token = bytes_per_token(&dataset, &eval_set);
        let peak_lr = scaled_peak_lr(t.lr, cfg.tokens_per_step(), t.lr_reference_batch_tokens);
        let peak_tflops = match device {
            Device::Cuda(i) => flops::cuda_device_name(i)
                .and_then(|name| flops::gpu_peak_tflops(&name, precision.bf16_compute())),
            _ => None,
        };
        let state = TrainState {
            step: 0,
            tokens: 0,
            data_position: primary.batches.position(),
            loss_ema: None,
            elapsed_s: 0.0,
            model: model_cfg,
            run_config: toml::to_string(&cfg).expect("config serializes"),
            forge_version: env!("CARGO_PKG_VERSION").to_string(),
            worker_positions: Vec::new(),
            control: RunControl::default(),
            source_windows: Vec::new(),
        };
        let pipeline = stage.map(|spec| {
            std::sync::Mutex::new(Pipeline {
                spec,
                runner: StageRunner::new(&state.model, &primary.vs, spec.stage, spec.stages),
                link: None,
                wire: StageDtype::F32,
                more: true,
            })
        });
        let mut trainer = Trainer {
            pipeline,
            observer: None,
            control: None,
            cfg,
            device,
            dataset,
            primary,
            others,
            exchange,
            timing: StepTiming::default(),
            failed: None,
            fault: None,
            eval_set,
            eval_bytes_per_token,
            ckpts,
            last_checkpoint: std::sync::Mutex::new(None),
            writing: std::sync::Mutex::new(None),
            staging: Default::default(),
            hold_writes: Arc::new(AtomicU64::new(u64::MAX)),
            state,
            peak_lr,
            peak_tflops,
        };
        // Worker 0's parameters everywhere.
        trainer.broadcast_params()?;
        trainer.broadcast_optimizer()?;
        if let Some(dir) = resume {
            trainer.resume_from(&dir)?;
        }
        Ok(trainer)
    }

    pub fn step(&self) -> u64 {
        self.state.step
    }

    /// The stage this trainer holds, if it holds one.
    pub fn stage(&self) -> Option<StageSpec> {
        self.pipeline.as_ref().map(|p| self.lock_pipeline(p).spec)
    }

    /// The parameter this stage holds whose value the first stage's state sets (the last
    /// stage's copy of a tied embedding): a DiLoCo node leaves it out of its outer state.
    pub fn derived_param(&self) -> Option<&'static str> {
        let pipeline = self.pipeline.as_ref()?;
        self.lock_pipeline(pipeline)
            .runner
            .derived_param(&self.state.model)
    }

    /// Gives the last stage's copy of the tied embedding the first stage's value (after an
    /// outer step changed it); every stage of the pipeline calls it at the same points.
    fn sync_tied(&self) -> Result<()> {
        let Some(pipeline) = &self.pipeline else {
            return Ok(());
        };
        let mut pipeline = self.lock_pipeline(pipeline);
        let Pipeline { runner, link, .. } = &mut *pipeline;
        match link {
            Some(link) => runner.sync_tied(&self.primary.vs, link.as_mut()),
            None => Err(Error::Pipeline("no link to the other stages yet".into())),
        }
    }

    /// Joins this stage to the others: every later step and evaluation runs over `link`.
    pub fn set_stage_link(&mut self, link: Box<dyn StageLink>) -> Result<()> {
        let Some(pipeline) = &self.pipeline else {
            return Err(Error::Pipeline(
                "this trainer holds the whole model, not a pipeline stage".into(),
            ));
        };
        let mut pipeline = self.lock_pipeline(pipeline);
        pipeline.link = Some(link);
        pipeline.runner.restart_exchanges();
        pipeline.more = true;
        Ok(())
    }

    /// Lets go of the link to the other stages once every stage is done with it: a node about
    /// to exit calls it after its last exchange (the final evaluation), so that closing its
    /// connections does not cut off what another stage has yet to read. A stage that is gone
    /// or fails is not waited for.
    pub fn leave_pipeline(&mut self) {
        let Some(pipeline) = &self.pipeline else {
            return;
        };
        let mut pipeline = self.lock_pipeline(pipeline);
        let Pipeline { runner, link, .. } = &mut *pipeline;
        if let Some(mut link) = link.take()
            && let Err(e) = runner.barrier(link.as_mut())
        {
            tracing::debug!("leaving the pipeline: {e}");
        }
    }

    fn lock_pipeline<'p>(
        &self,
        pipeline: &'p std::sync::Mutex<Pipeline>,
    ) -> std::sync::MutexGuard<'p, Pipeline> {
        pipeline.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Training tokens consumed so far (by the whole run, for a node that joined one).
    pub fn tokens(&self) -> u64 {
        self.state.tokens
    }

    /// Reads data shard `index` of `count` (the replica's share of the corpus), from its start.
    /// Each data-parallel worker reads its own part of that shard.
    pub fn set_data_shard(&mut self, index: usize, count: usize) -> Result<()> {
        let workers = 1 + self.others.len();
        self.primary
            .batches
            .reshard(index * workers, count * workers)?;
        self.state.data_position = self.primary.batches.position();
        let timeout = self.cfg.train.parallel.timeout();
        for other in &self.others {
            other.send(Command::SetShard {
                index: index * workers + other.rank,
                count: count * workers,
            })?;
        }
        self.collect_positions(timeout, "a data reshard")
    }

    /// Reads the stream positions `ranges` (a replica's lease for a round) from their start:
    /// every inner step takes the next `batch_size` of them, each data-parallel worker its
    /// part, and [`Trainer::inner_steps`] stops when they run out. Returns the steps they hold.
    pub fn set_data_lease(&mut self, ranges: &[SeqRange]) -> Result<u64> {
        let t = &self.cfg.train;
        let workers = 1 + self.others.len();
        let batches = t
            .parallel
            .worker_batches(workers, t.batch_size, t.micro_batch)?;
        let block = batches.iter().map(|b| b.sequences() as u64).sum::<u64>();
        let mut offset = 0;
        let mut shares = batches.iter().map(|b| {
            let take = b.sequences() as u64;
            let share = LeaseShare {
                ranges: ranges.to_vec(),
                block,
                offset,
                take,
            };
            offset += take;
            share
        });
        let primary = shares.next().expect("at least one worker");
        let steps = primary.steps();
        self.primary.batches.lease(primary)?;
        for (other, share) in self.others.iter().zip(shares) {
            other.send(Command::Lease(share))?;
        }
        let timeout = self.cfg.train.parallel.timeout();
        self.collect_positions(timeout, "a data lease")?;
        Ok(steps)
    }

    /// The stream positions this replica's inner steps read of the lease set last, in order.
    pub fn data_consumed(&self) -> Vec<SeqRange> {
        self.data_consumed_after(0)
    }

    /// [`Trainer::data_consumed`] once `steps` more steps have read the lease (as far as it
    /// holds them): what a round reports when steps of it still run while it syncs.
    pub fn data_consumed_after(&self, steps: u64) -> Vec<SeqRange> {
        self.primary
            .batches
            .lease_consumed_after(steps)
            .unwrap_or_default()
    }

    /// An estimate of this node's microseconds per inner step before it has trained: worker 0's
    /// forward and backward passes for one step on made-up tokens (after one untimed pass),
    /// which change nothing of the run's state. The optimizer step and the gradient exchange
    /// are left out, and CPU workers sharing cores are measured alone, so it errs fast; a
    /// round's measurement replaces it.
    pub fn probe_us_per_step(&self) -> Result<u64> {
        let seq_len = self.cfg.train.seq_len as usize;
        self.primary.probe(seq_len)?;
        let timed = (0..2)
            .map(|_| self.primary.probe(seq_len))
            .collect::<Result<Vec<_>>>()?;
        let mean = timed.iter().map(|d| d.as_secs_f64()).sum::<f64>() / timed.len() as f64;
        Ok((mean * 1e6).max(1.0) as u64)
    }

    /// With a `[data] mix`: the training tokens this run's steps read of each source, by name.
    pub fn source_tokens(&self) -> Option<std::collections::BTreeMap<String, u64>> {
        let mix = self.dataset.mixture.as_ref()?;
        let seq_len = self.cfg.train.seq_len;
        Some(
            mix.names()
                .iter()
                .enumerate()
                .map(|(s, name)| {
                    let windows = self.state.source_windows.get(s).copied().unwrap_or(0);
                    (name.clone(), windows * seq_len as u64)
                })
                .collect(),
        )
    }

    /// What this trainer's training stream is, for the coordinator to check against the run's:
    /// the digest of its training tokens and tokenizer, and its windows per epoch.
    pub fn data_digest(&self) -> DataDigest {
        let mut hasher = Sha256::new();
        let mut chunk = vec![0u32; 1 << 16];
        let mut bytes = Vec::with_capacity(4 * chunk.len());
        for cache in &self.dataset.train {
            let tokens = cache.tokens();
            let mut start = 0;
            while start < tokens.len() {
                let n = chunk.len().min(tokens.len() - start);
                tokens.read(start, &mut chunk[..n]);
                bytes.clear();
                bytes.extend(chunk[..n].iter().flat_map(|t| t.to_le_bytes()));
                hasher.update(&bytes);
                start += n;
            }
        }
        // A mixture's weights decide which windows the positions name, as its tokens do.
        if let Some(mix) = &self.dataset.mixture {
            hasher.update(b"\0mix\0");
            hasher.update(mix.schedule_key().as_bytes());
        }
        // The tokenizer's hash is hex SHA-256 by construction; hashing its text keeps any
        // other form distinct too.
        let tokenizer_hash = self.dataset.tokenizer.hash();
        let mut tokenizer = [0u8; 32];
        if hex::decode_to_slice(tokenizer_hash, &mut tokenizer).is_err() {
            tokenizer = Sha256::digest(tokenizer_hash.as_bytes()).into();
        }
        DataDigest {
            corpus: Digest(hasher.finalize().into()),
            tokenizer: Digest(tokenizer),
            windows: self.primary.batches.windows() as u64,
        }
    }

    /// Moves the schedule to `step` (and the token count to `tokens`): a node that joins a run
    /// in progress takes the run's position along with its global state.
    pub fn set_progress(&mut self, step: u64, tokens: u64) {
        self.state.step = step;
        self.state.tokens = tokens;
    }

    /// Makes data-parallel worker `rank` (1..) fail in the next step, for fault-tolerance tests
    /// and chaos runs.
    pub fn inject_fault(&mut self, rank: usize, fault: Fault) -> Result<()> {
        if rank == 0 || rank > self.others.len() {
            return Err(Error::Parallel(format!(
                "no data-parallel worker {rank} to inject a fault into (workers 1..={})",
                self.others.len()
            )));
        }
        self.fault = Some((rank, fault));
        Ok(())
    }

    /// Data-parallel workers on this node (1 without data parallelism).
    pub fn workers(&self) -> usize {
        1 + self.others.len()
    }

    /// Time spent in optimizer steps since this trainer started, and the gradient exchange's
    /// part of it.
    pub fn timing(&self) -> StepTiming {
        self.timing
    }

    /// Copies worker 0's parameters to every other worker: at the start, and after anything
    /// that changes them outside a step (a DiLoCo outer step, a resume).
    pub fn broadcast_params(&mut self) -> Result<()> {
        for other in &self.others {
            other.send(Command::LoadParams(self.primary.params_for(other.device)))?;
        }
        self.collect_positions(self.cfg.train.parallel.timeout(), "a parameter broadcast")
    }

    fn broadcast_optimizer(&mut self) -> Result<()> {
        for other in &self.others {
            other.send(Command::LoadOptimizer(
                self.primary.optimizer_for(other.device),
            ))?;
        }
        self.collect_positions(self.cfg.train.parallel.timeout(), "an optimizer broadcast")
    }

    /// Waits for every other worker's answer to the command just sent (with `wait`) and records
    /// their data positions.
    fn collect_positions(&mut self, timeout: std::time::Duration, what: &str) -> Result<()> {
        let mut positions = Vec::with_capacity(self.others.len());
        let mut first_error = None;
        for other in &self.others {
            match other.wait(timeout, what) {
                Ok(Reply::Done(p)) | Ok(Reply::Stepped(_, p)) => positions.push(p),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        self.state.worker_positions = positions;
        Ok(())
    }

    /// Up to `steps` optimizer steps, fewer if `budget` runs out or `stop` is set (a DiLoCo
    /// round's inner loop: slow nodes do fewer steps rather than make the others wait). The lr
    /// follows `schedule`: the run's progress rather than this trainer's step count.
    pub fn inner_steps(
        &mut self,
        steps: u64,
        budget: Option<std::time::Duration>,
        stop: &AtomicBool,
        schedule: ScheduleSpan,
    ) -> Result<InnerSummary> {
        let started = Instant::now();
        let mut summary = InnerSummary::default();
        let elapsed_before = self.state.elapsed_s;
        // The stages of a pipeline must take the same steps: the stop and the budget are each
        // stage's wish after a step, and the pipeline goes on only if every stage wishes so.
        let staged = self.pipeline.is_some();
        if staged {
            // The last stage's copy of a tied embedding takes the first stage's value, which
            // an outer step since the last inner steps may have changed.
            self.sync_tied()?;
        }
        let out_of_time = |summary: &InnerSummary| {
            budget.is_some_and(|b| started.elapsed() >= b) && summary.steps > 0
        };
        while summary.steps < steps {
            if staged {
                if summary.steps > 0 && !self.stages_want_more() {
                    break;
                }
            } else if stop.load(Ordering::Relaxed) || out_of_time(&summary) {
                break;
            }
            if self.primary.batches.lease_steps_left() == Some(0) {
                break;
            }
            let position = schedule.start + (summary.steps as f64 * schedule.per_step) as u64;
            // A stage's wish for one more step: steps and budget left after this one (at the
            // pace so far), and no stop.
            let per_step = started.elapsed() / (summary.steps as u32 + 1);
            let time_left = budget.is_none_or(|b| started.elapsed() + 2 * per_step < b);
            let more = summary.steps + 1 < steps && time_left && !stop.load(Ordering::Relaxed);
            let (loss, grad_norm, lr) = self.train_step_at(position, more)?;
            self.guard(loss)?;
            summary.steps += 1;
            summary.tokens += self.cfg.tokens_per_step();
            summary.loss_sum += loss;
            summary.last_loss = loss;
            summary.last_grad_norm = grad_norm;
            summary.last_lr = lr;
            summary.seconds = started.elapsed().as_secs_f64();
            if let Some(observer) = &mut self.observer {
                observer(&summary, steps);
            }
        }
        self.state.elapsed_s = elapsed_before + started.elapsed().as_secs_f64();
        summary.seconds = started.elapsed().as_secs_f64();
        Ok(summary)
    }

    /// The schedule's decay phase entered early (a DiLoCo node: the coordinator's anneal, the
    /// same on every node), or as the config plans it (None).
    pub fn set_anneal(&mut self, anneal: Option<Anneal>) {
        self.state.control.anneal = anneal;
    }

    /// Takes `forge-node control` requests from `inbox` in [`Trainer::run`], between steps.
    pub fn set_control(&mut self, inbox: Inbox) {
        self.control = Some(inbox);
    }

    /// The step the run ends at: its budget, or earlier after a stop or an anneal.
    fn run_end(&self) -> u64 {
        self.state.control.end(self.cfg.total_steps())
    }

    /// Has `observer` told after every inner step of [`Trainer::inner_steps`] (None: nobody).
    pub fn observe_steps(&mut self, observer: Option<StepObserver>) {
        self.observer = observer;
    }

    pub fn config(&self) -> &RunConfig {
        &self.cfg
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn model(&self) -> &Model {
        &self.primary.model
    }

    /// Worker 0's parameters. After changing them, call [`Trainer::broadcast_params`].
    pub fn var_store(&self) -> &VarStore {
        &self.primary.vs
    }

    /// Continues from checkpoint `dir` (written by [`Trainer::save_checkpoint`] or
    /// [`Trainer::save_checkpoint_with`]): model, optimizer, data positions, step.
    pub fn resume_from(&mut self, dir: &Path) -> Result<()> {
        let dir = dir.to_path_buf();
        let state: TrainState = read_json(&dir.join("state.json"))?;
        if state.model != self.state.model {
            return Err(Error::Checkpoint {
                path: dir,
                why: "it was written for a different model; use another out_dir or set [checkpoint] resume = false".into(),
            });
        }
        weights::load(
            &mut self.primary.vs,
            &state.model,
            &dir.join("model.safetensors"),
        )?;
        let opt_path = dir.join("optimizer.safetensors");
        let opt_state: HashMap<String, Tensor> = Tensor::read_safetensors(&opt_path)
            .map_err(Error::torch(format!("reading {}", opt_path.display())))?
            .into_iter()
            .collect();
        self.primary.opt.load_state_tensors(&opt_state)?;
        self.primary.batches.seek(state.data_position)?;
        self.broadcast_params()?;
        self.broadcast_optimizer()?;
        if state.worker_positions.len() == self.others.len() {
            for (other, position) in self.others.iter().zip(&state.worker_positions) {
                other.send(Command::Seek(*position))?;
            }
            self.collect_positions(self.cfg.train.parallel.timeout(), "a data seek")?;
        } else {
            tracing::warn!(
                "the checkpoint was written by {} data-parallel workers, this run has {}: \
                 workers 1.. start their data shards from the beginning",
                state.worker_positions.len() + 1,
                self.others.len() + 1
            );
        }
        tracing::info!("resumed from {} (step {})", dir.display(), state.step);
        self.remember_checkpoint(&dir);
        self.state = TrainState {
            run_config: self.state.run_config.clone(),
            worker_positions: self.state.worker_positions.clone(),
            ..state
        };
        Ok(())
    }

    /// Writes a checkpoint of the current step.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        self.wait_for_checkpoint()?;
        self.save_checkpoint_with(&self.ckpts, self.state.step, |_| Ok(()))
    }

    /// Starts writing a checkpoint of this step in the background and returns as soon as the
    /// state is copied out: training goes on while the files are written, hashed, synced and
    /// committed by rename (a crash before that leaves the previous checkpoint the newest).
    /// A save still under way is waited for first; its error, if it failed, is returned here.
    pub fn save_checkpoint_async(&self) -> Result<()> {
        let started = Instant::now();
        self.wait_for_checkpoint()?;
        let waited = started.elapsed();
        let handle =
            self.save_checkpoint_in_background(&self.ckpts, self.state.step, |_| Ok(()), || {})?;
        tracing::debug!(
            "checkpoint of step {}: waited {:.3} s for the previous one, copied the state in {:.3} s",
            self.state.step,
            waited.as_secs_f64(),
            (started.elapsed() - waited).as_secs_f64()
        );
        *self.writing.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        Ok(())
    }

    /// Copies this trainer's state out and writes it as a checkpoint into `ckpts` under `key`
    /// on a thread of its own, with whatever `extra` adds to the directory first (a DiLoCo
    /// node's outer state, copied out by the caller): training goes on meanwhile. The thread's
    /// result says where the checkpoint was committed, or why it was not (the previous one
    /// stays the newest then). `done` runs on that thread as it ends, however it ends (an
    /// event loop's wake-up).
    pub fn save_checkpoint_in_background(
        &self,
        ckpts: &CheckpointDir,
        key: u64,
        extra: impl FnOnce(&Path) -> Result<()> + Send + 'static,
        done: impl FnOnce() + Send + 'static,
    ) -> Result<std::thread::JoinHandle<Result<PathBuf>>> {
        /// Runs its function when dropped: at the end of the thread, a panic included.
        struct OnDrop<F: FnOnce()>(Option<F>);
        impl<F: FnOnce()> Drop for OnDrop<F> {
            fn drop(&mut self) {
                if let Some(f) = self.0.take() {
                    f();
                }
            }
        }
        let snapshot = self.snapshot(true)?;
        let ckpts = ckpts.clone();
        let hold = self.hold_writes.clone();
        std::thread::Builder::new()
            .name("checkpoint-writer".into())
            .spawn(move || {
                let _done = OnDrop(Some(done));
                lowest_priority();
                ckpts.save(key, |dir| {
                    extra(dir)?;
                    snapshot.write(dir, || {
                        while key >= hold.load(Ordering::Relaxed) {
                            std::thread::sleep(std::time::Duration::from_millis(5));
                        }
                    })
                })
            })
            .map_err(|e| Error::Io {
                context: "starting the checkpoint writer".into(),
                source: e,
            })
    }

    /// Holds background checkpoint writes back (`true`) halfway, the model written and the
    /// rest not, until released (`false`): a test that trains on while a save is pending.
    pub fn hold_checkpoint_writes(&self, hold: bool) {
        self.hold_checkpoint_writes_from(if hold { 0 } else { u64::MAX });
    }

    /// Holds background writes of checkpoints of `step` and later halfway, for good (`u64::MAX`
    /// releases them): a test that kills a run in the middle of a save.
    pub fn hold_checkpoint_writes_from(&self, step: u64) {
        self.hold_writes.store(step, Ordering::Relaxed);
    }

    /// Waits for the checkpoint being written in the background, if any; returns where it was
    /// committed, or why it could not be.
    pub fn wait_for_checkpoint(&self) -> Result<Option<PathBuf>> {
        let handle = self
            .writing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(handle) = handle else {
            return Ok(None);
        };
        let written = handle.join().map_err(|_| Error::Checkpoint {
            path: self.ckpts.root().to_path_buf(),
            why: "the checkpoint writer panicked; the previous checkpoint is intact".into(),
        })??;
        self.remember_checkpoint(&written);
        Ok(Some(written))
    }

    /// Writes a checkpoint into `ckpts` under `key` (atomically, like every checkpoint), with
    /// whatever `extra` adds to the directory first (a DiLoCo node's outer state).
    pub fn save_checkpoint_with(
        &self,
        ckpts: &CheckpointDir,
        key: u64,
        extra: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<PathBuf> {
        let snapshot = self.snapshot(false)?;
        let written = ckpts.save(key, |dir| {
            extra(dir)?;
            snapshot.write(dir, || {})
        })?;
        self.remember_checkpoint(&written);
        Ok(written)
    }

    /// What a checkpoint holds of this trainer, on the CPU: copies when `copy` (for a writer
    /// that runs while training goes on), otherwise views where the tensors already are. A
    /// GPU trainer's copies go into its pinned staging buffers.
    fn snapshot(&self, copy: bool) -> Result<CheckpointSnapshot> {
        let optimizer = self.primary.opt.state_tensors();
        let device = self.primary.vs.device();
        let (model, optimizer, staging) = if copy && device != Device::Cpu {
            let variables = self.primary.vs.variables();
            let model: std::collections::BTreeMap<String, Tensor> = variables.into_iter().collect();
            let sources: Vec<(Tensor, tch::Kind)> = model
                .values()
                .map(|t| (t.shallow_clone(), tch::Kind::Float))
                .chain(optimizer.iter().map(|(_, t)| (t.shallow_clone(), t.kind())))
                .collect();
            let (mut copies, lease) = self
                .staging
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .copy(Some(device), &sources);
            let optimizer_copies = copies.split_off(model.len());
            (
                model.into_keys().zip(copies).collect(),
                optimizer
                    .into_iter()
                    .map(|(k, _)| k)
                    .zip(optimizer_copies)
                    .collect(),
                Some(lease),
            )
        } else {
            let optimizer = optimizer
                .into_iter()
                .map(|(k, t)| {
                    let cpu = t.to_device(Device::Cpu);
                    let cpu = if copy && cpu.data_ptr() == t.data_ptr() {
                        cpu.copy()
                    } else {
                        cpu
                    };
                    (k, cpu)
                })
                .collect();
            (weights::cpu_f32(&self.primary.vs, copy), optimizer, None)
        };
        Ok(CheckpointSnapshot {
            model,
            optimizer,
            state: self.state.clone(),
            tokenizer: self.dataset.tokenizer.to_json()?,
            tokenizer_specials: self.dataset.tokenizer.specials_json(),
            _staging: staging,
        })
    }

    fn remember_checkpoint(&self, dir: &Path) {
        *self
            .last_checkpoint
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(dir.to_path_buf());
    }

    /// The checkpoint this trainer last wrote or resumed from, if any (the directory may have
    /// been rotated away or damaged since; a resume checks it again).
    pub fn last_checkpoint(&self) -> Option<PathBuf> {
        self.last_checkpoint
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The folder of this run's own checkpoints.
    pub fn checkpoints(&self) -> &CheckpointDir {
        &self.ckpts
    }

    /// Mean loss over the fixed validation windows, and bits per byte.
    pub fn evaluate(&self) -> (f64, f64) {
        let _guard = tch::no_grad_guard();
        let loss = match &self.pipeline {
            Some(pipeline) if self.sync_tied().is_ok() => {
                let batches: Vec<(Tensor, Tensor)> = self
                    .eval_set
                    .iter()
                    .map(|batch| self.primary.to_tensors(batch))
                    .collect();
                let mut pipeline = self.lock_pipeline(pipeline);
                let Pipeline { runner, link, .. } = &mut *pipeline;
                let evaluated = match link {
                    Some(link) => {
                        runner.evaluate(&self.primary.model, self.device, link.as_mut(), &batches)
                    }
                    None => Err(Error::Pipeline("no link to the other stages yet".into())),
                };
                match evaluated {
                    Ok((sum, tokens)) => sum / tokens.max(1.0),
                    Err(e) => {
                        tracing::warn!("pipeline evaluation failed: {e}");
                        f64::NAN
                    }
                }
            }
            Some(_) => {
                tracing::warn!("pipeline evaluation failed: the stages are not joined");
                f64::NAN
            }
            None => {
                let mut total = 0.0;
                let mut count = 0usize;
                // A long evaluation (a full validation set) says how far it is every 5 s.
                let started = Instant::now();
                let mut shown = started;
                for (done, batch) in self.eval_set.iter().enumerate() {
                    let (ids, tgt) = self.primary.to_tensors(batch);
                    let loss = self.primary.model.eval_loss(&ids, &tgt);
                    total += f64::try_from(loss).unwrap_or(f64::NAN) * batch.targets.len() as f64;
                    count += batch.targets.len();
                    if shown.elapsed().as_secs_f64() >= 5.0 {
                        tracing::info!(
                            "evaluating: {} of {} batches in {:.0} s",
                            done + 1,
                            self.eval_set.len(),
                            started.elapsed().as_secs_f64()
                        );
                        shown = Instant::now();
                    }
                }
                total / count.max(1) as f64
            }
        };
        (
            loss,
            loss / std::f64::consts::LN_2 / self.eval_bytes_per_token,
        )
    }

    /// A sample continuation of the configured prompt.
    pub fn sample(&self) -> String {
        if let Some(spec) = self.stage() {
            return format!(
                "(no sample: this node holds stage {} of {}, layers {}..{}; sampling needs the \
                 whole model, e.g. from an exported checkpoint)",
                spec.stage + 1,
                spec.stages,
                spec.layers.start,
                spec.layers.end
            );
        }
        let prompt = self
            .dataset
            .tokenizer
            .encode(&self.cfg.eval.prompt)
            .unwrap_or_default();
        let new = generate(
            &self.primary.model,
            &prompt,
            &self.cfg.eval.sample,
            &self.dataset.tokenizer.stop_ids(),
            self.device,
        );
        format!(
            "{}{}",
            self.cfg.eval.prompt,
            self.dataset.tokenizer.decode(&new).unwrap_or_default()
        )
    }

    /// One optimizer step (with gradient accumulation, and the gradient exchange among
    /// data-parallel workers); returns (loss, grad_norm, lr).
    pub fn train_step(&mut self) -> Result<(f64, f64, f64)> {
        let position = self.state.step;
        self.train_step_at(position, true)
    }

    /// [`Trainer::train_step`] with the lr schedule at `position` instead of this trainer's own
    /// step count (a DiLoCo node follows the run's progress).
    /// `more`: whether this trainer wants another step after this one (a pipeline stage's
    /// stages agree on it; a whole replica ignores it).
    fn train_step_at(&mut self, position: u64, more: bool) -> Result<(f64, f64, f64)> {
        if let Some(reason) = &self.failed {
            return Err(Error::Parallel(format!(
                "data parallelism on this node stopped earlier: {reason}"
            )));
        }
        let started = Instant::now();
        let t = &self.cfg.train;
        let total = self.cfg.total_steps();
        let anneal = self.state.control.anneal;
        let lr = self.peak_lr * t.schedule.factor_annealed(position, total, anneal);
        let grad_clip = t.grad_clip;
        if self.pipeline.is_some() {
            return self.stage_step(lr, grad_clip, more, started);
        }
        let timeout = t.parallel.timeout();
        let fault = self.fault.take();
        for other in &self.others {
            other.send(Command::Step {
                lr,
                grad_clip,
                fault: fault.filter(|(rank, _)| *rank == other.rank).map(|f| f.1),
            })?;
        }
        let mine = self.primary.step(lr, grad_clip, self.exchange.as_ref());
        if let (Err(e), Some(exchange)) = (&mine, &self.exchange) {
            exchange
                .reducer
                .abort(format!("data-parallel worker 0 failed: {e}"));
        }
        // After a failure the reducer has told every worker; their answers come at once.
        let wait = if mine.is_ok() {
            2 * timeout
        } else {
            timeout.min(std::time::Duration::from_secs(5))
        };
        let mut loss = 0.0;
        let mut positions = Vec::with_capacity(self.others.len());
        let mut source_windows = Vec::new();
        let mut other_error = None;
        for other in &self.others {
            match other.wait(wait, "its part of the step") {
                Ok(Reply::Stepped(out, position)) => {
                    loss += out.weighted_loss;
                    positions.push(position);
                    add_counts(&mut source_windows, &out.source_windows);
                }
                Ok(Reply::Done(_)) => {
                    other_error.get_or_insert(Error::Parallel(format!(
                        "data-parallel worker {} answered a step out of turn",
                        other.rank
                    )));
                }
                Err(e) => {
                    other_error.get_or_insert(e);
                }
            }
        }
        let out = mine.and_then(|out| other_error.map_or(Ok(out), Err));
        let out = match out {
            Ok(out) => out,
            Err(e) => {
                // The workers are out of step now (one may still be running): no more steps.
                self.failed = Some(e.to_string());
                return Err(e);
            }
        };
        loss += out.weighted_loss;
        add_counts(&mut source_windows, &out.source_windows);
        add_counts(&mut self.state.source_windows, &source_windows);
        self.state.step += 1;
        self.state.tokens += self.cfg.tokens_per_step();
        self.state.data_position = self.primary.batches.position();
        if !self.others.is_empty() {
            self.state.worker_positions = positions;
        }
        self.timing.add(started, out.parts);
        Ok((loss, out.grad_norm, lr))
    }

    /// Whether every stage wanted another step after the last one.
    fn stages_want_more(&self) -> bool {
        self.pipeline
            .as_ref()
            .is_none_or(|p| self.lock_pipeline(p).more)
    }

    /// A pipeline stage's step: the worker's micro-batches through the pipeline's schedule,
    /// clipping by the norm over every stage, the optimizer step. `more`: whether this stage
    /// wants another step after this one (every stage must, or the pipeline stops).
    fn stage_step(
        &mut self,
        lr: f64,
        grad_clip: f64,
        more: bool,
        started: Instant,
    ) -> Result<(f64, f64, f64)> {
        let mut parts = StepParts::default();
        let micro = self.primary.batch.accumulation;
        let batches: Vec<Batch> = (0..micro)
            .map(|_| self.primary.batches.next_batch())
            .collect();
        // Every stage reads the replica's batches (the first its inputs, the last its targets).
        let read = self.primary.batches.take_source_windows();
        add_counts(&mut self.state.source_windows, &read);
        let tensors: Vec<(Tensor, Tensor)> =
            batches.iter().map(|b| self.primary.to_tensors(b)).collect();
        let ids = Tensor::cat(&tensors.iter().map(|(i, _)| i).collect::<Vec<_>>(), 0);
        let targets = Tensor::cat(&tensors.iter().map(|(_, t)| t).collect::<Vec<_>>(), 0);
        let clock = parts.data.lap(started);
        let pipeline = self.pipeline.as_ref().expect("a stage trainer");
        let mut pipeline = pipeline.lock().unwrap_or_else(|e| e.into_inner());
        let schedule = ScheduleConfig {
            micro_batches: micro,
            wire: pipeline.wire,
        };
        let Pipeline { runner, link, .. } = &mut *pipeline;
        let link = match link {
            Some(link) => link.as_mut(),
            None => return Err(Error::Pipeline("no link to the other stages yet".into())),
        };
        let worker = &mut self.primary;
        let (grads, loss) = runner.gradients(
            &worker.model,
            &worker.vs,
            link,
            Some(&ids),
            Some(&targets),
            schedule,
        )?;
        let clock = parts.forward_backward.lap(clock);
        let (step, agreed) =
            runner.finish_step(link, &grads, loss, &mut worker.opt, lr, grad_clip, more)?;
        parts.optimizer.lap(clock);
        pipeline.more = agreed;
        drop(pipeline);
        self.state.step += 1;
        self.state.tokens += self.cfg.tokens_per_step();
        self.state.data_position = self.primary.batches.position();
        self.timing.add(started, parts);
        Ok((step.loss, step.grad_norm, lr))
    }

    /// Checks a loss against the moving average; an error explains the stop.
    fn guard(&mut self, loss: f64) -> Result<()> {
        let step = self.state.step;
        let keep = self
            .last_checkpoint()
            .map_or("no checkpoint was saved yet".to_string(), |p| {
                format!("the last good checkpoint is {}", p.display())
            });
        if !loss.is_finite() {
            return Err(Error::Diverged(format!(
                "loss is {loss} at step {step}; {keep}. Lower [train] lr or raise warmup, then resume"
            )));
        }
        let settle = 2 * warmup_of(&self.cfg);
        if let Some(ema) = self.state.loss_ema
            && step > settle
            && loss > ema * self.cfg.train.divergence_factor
        {
            return Err(Error::Diverged(format!(
                "loss {loss:.4} at step {step} is over {}x its moving average {ema:.4}; {keep}. \
                 Lower [train] lr, then resume",
                self.cfg.train.divergence_factor
            )));
        }
        self.state.loss_ema = Some(self.state.loss_ema.map_or(loss, |e| 0.9 * e + 0.1 * loss));
        Ok(())
    }

    /// Trains to the end of the budget, or until `stop` is set.
    pub fn run(&mut self, stop: &Arc<AtomicBool>) -> Result<RunSummary> {
        let total = self.cfg.total_steps();
        let out_dir = self.cfg.train.out_dir.clone();
        let mut log = MetricsLog::open(
            &out_dir.join("metrics.jsonl"),
            total,
            self.state.step,
            self.cfg.train.log_every,
        )?;
        log.note(&format!(
            "training {} {:.2}M params on {}{} for {total} steps ({} tokens/step), run dir {}",
            self.state.model.family,
            self.state.model.param_count() as f64 / 1e6,
            device_name(self.device),
            if self.others.is_empty() {
                String::new()
            } else {
                format!(" and {} more data-parallel workers", self.others.len())
            },
            self.cfg.tokens_per_step(),
            out_dir.display()
        ));
        let flops_per_token = self
            .state
            .model
            .train_flops_per_token(self.cfg.train.seq_len);
        let started = Instant::now();
        let elapsed_before = self.state.elapsed_s;
        let mut last_eval = (None, None);
        let mut phases = Phases::default();
        let timing_before = self.timing;
        let first_step = self.state.step;
        // The wall clock and tokens at the previous metrics line.
        let mut previous = (started, self.state.tokens);
        let mut stopped = false;
        while self.state.step < self.run_end() {
            if stop.load(Ordering::Relaxed) {
                let checkpoint = self.save_checkpoint()?;
                log.note(&format!(
                    "stopped at step {}; checkpoint {}; run the same command to resume",
                    self.state.step,
                    checkpoint.display()
                ));
                log.finish();
                return Ok(RunSummary {
                    outcome: Outcome::Interrupted {
                        step: self.state.step,
                        checkpoint,
                    },
                    final_eval_loss: last_eval.0,
                    final_eval_bpb: last_eval.1,
                    sample: None,
                    out_dir,
                });
            }
            match self.take_control(&log)? {
                Some(ControlAction::Stop) => {
                    stopped = true;
                    break;
                }
                Some(ControlAction::Abort) => {
                    log.finish();
                    return Ok(RunSummary {
                        outcome: Outcome::Aborted {
                            step: self.state.step,
                        },
                        final_eval_loss: last_eval.0,
                        final_eval_bpb: last_eval.1,
                        sample: None,
                        out_dir,
                    });
                }
                Some(ControlAction::Anneal) => log.set_total(self.run_end()),
                Some(ControlAction::Save) | None => {}
            }
            let step_start = Instant::now();
            let (loss, grad_norm, lr) = self.train_step()?;
            let step_s = step_start.elapsed().as_secs_f64();
            phases.step_s += step_s;
            phases.set_step_parts(&self.timing.since(&timing_before));
            self.guard(loss)?;
            self.state.elapsed_s = elapsed_before + started.elapsed().as_secs_f64();
            let tokens_per_s = self.cfg.tokens_per_step() as f64 / step_s;
            let now = Instant::now();
            let wall_tokens_per_s = (self.state.tokens - previous.1) as f64
                / now.duration_since(previous.0).as_secs_f64().max(1e-9);
            previous = (now, self.state.tokens);
            phases.rest_of(started.elapsed().as_secs_f64());
            let mut m = StepMetrics {
                step: self.state.step,
                tokens: self.state.tokens,
                loss,
                lr,
                grad_norm,
                tokens_per_s,
                wall_tokens_per_s,
                phases,
                mfu: self
                    .peak_tflops
                    .map(|p| flops_per_token * tokens_per_s / 1e12 / p),
                eval_loss: None,
                eval_bpb: None,
                elapsed_s: self.state.elapsed_s,
                source_tokens: self.source_tokens(),
            };
            let done = self.state.step == self.run_end();
            if self.state.step.is_multiple_of(self.cfg.eval.every) || done {
                let eval_start = Instant::now();
                let (eval_loss, bpb) = self.evaluate();
                m.eval_loss = Some(eval_loss);
                m.eval_bpb = Some(bpb);
                last_eval = (Some(eval_loss), Some(bpb));
                let sample = self.sample();
                phases.eval_s += eval_start.elapsed().as_secs_f64();
                log.record(&m)?;
                log.note(&format!("sample: {sample}"));
            } else {
                log.record(&m)?;
            }
            if self.state.step.is_multiple_of(self.cfg.checkpoint.every) && !done {
                let save_start = Instant::now();
                if self.cfg.checkpoint.background {
                    // Written while the next steps run.
                    self.save_checkpoint_async()?;
                } else {
                    self.save_checkpoint()?;
                }
                phases.checkpoint_s += save_start.elapsed().as_secs_f64();
            }
        }
        if stopped {
            // The operator's stop: this step's model is the run's, evaluated like a budget's end.
            let (loss, bpb) = self.evaluate();
            last_eval = (Some(loss), Some(bpb));
            log.note(&format!(
                "stopped by forge-node control at step {}: validation loss {loss:.4}",
                self.state.step
            ));
        }
        let save_start = Instant::now();
        let checkpoint = self.save_checkpoint()?;
        phases.checkpoint_s += save_start.elapsed().as_secs_f64();
        let wall = started.elapsed().as_secs_f64();
        phases.rest_of(wall);
        log.note(&format!(
            "wall clock {wall:.1} s for {} steps, {:.0} tokens/s: {}",
            self.state.step - first_step,
            (self.state.step - first_step) as f64 * self.cfg.tokens_per_step() as f64
                / wall.max(1e-9),
            phases.shares()
        ));
        log.finish();
        Ok(RunSummary {
            outcome: Outcome::Finished {
                step: self.state.step,
                checkpoint,
            },
            final_eval_loss: last_eval.0,
            final_eval_bpb: last_eval.1,
            sample: Some(self.sample()),
            out_dir,
        })
    }
}

impl Trainer {
    /// A `forge-node control` request waiting between two steps: answered, and carried out
    /// (a save, an anneal, a stop's new end), except that ending the loop is the caller's.
    /// Returns the action taken, if any.
    fn take_control(&mut self, log: &MetricsLog) -> Result<Option<ControlAction>> {
        let Some(request) = self
            .control
            .as_ref()
            .map(Inbox::take)
            .transpose()?
            .flatten()
        else {
            return Ok(None);
        };
        let step = self.state.step;
        let decided = match request.action {
            ControlAction::Save => Ok(format!(
                "a checkpoint of step {step} is written now ({})",
                self.ckpts
                    .root()
                    .join(crate::checkpoint::step_dir_name(step))
                    .display()
            )),
            ControlAction::Stop => {
                self.state.control.end_step = Some(step);
                Ok(format!(
                    "the run ends at step {step}: a final evaluation and checkpoint, then \
                     forge-node train exits 0"
                ))
            }
            ControlAction::Abort => Ok(format!(
                "the run ends at step {step} without saving (its newest checkpoint stays {}); \
                 forge-node train exits 0",
                self.last_checkpoint()
                    .map_or("none".to_string(), |dir| dir.display().to_string())
            )),
            ControlAction::Anneal => self.anneal_now(step),
        };
        let (accepted, what) = match decided {
            Ok(what) => (true, what),
            Err(why) => (false, why),
        };
        log.note(&format!("control {}: {what}", request.action));
        let answer = Answer {
            id: request.id,
            action: request.action,
            accepted,
            what,
            step,
        };
        if let Some(inbox) = &self.control {
            inbox.answer(&answer)?;
        }
        if !accepted {
            return Ok(None);
        }
        if request.action == ControlAction::Save {
            if self.cfg.checkpoint.background {
                self.save_checkpoint_async()?;
            } else {
                self.save_checkpoint()?;
            }
        }
        Ok(Some(request.action))
    }

    /// `control anneal` at `step`: the decay phase starts with the next step (see
    /// [`Anneal`]); or why not.
    fn anneal_now(&mut self, step: u64) -> std::result::Result<String, String> {
        if let Some(anneal) = self.state.control.anneal {
            return Ok(format!(
                "the run is in its decay phase since step {} already; it ends at step {}",
                anneal.start,
                anneal.end()
            ));
        }
        let total = self.cfg.total_steps();
        let anneal = self
            .cfg
            .train
            .schedule
            .anneal_at(step, total)
            .map_err(|e| format!("the run cannot anneal: {e}"))?;
        self.state.control.anneal = Some(anneal);
        Ok(match anneal.start < step {
            true => format!(
                "the run is in its planned decay phase since step {} already; it ends at step {}",
                anneal.start,
                anneal.end()
            ),
            false => format!(
                "the decay phase starts with the next step: {} steps down to the schedule's \
                 floor, and the run ends at step {}",
                anneal.steps,
                anneal.end()
            ),
        })
    }
}

fn warmup_of(cfg: &RunConfig) -> u64 {
    use crate::schedule::Schedule::*;
    match cfg.train.schedule {
        Cosine { warmup_steps, .. }
        | Wsd { warmup_steps, .. }
        | Infinite { warmup_steps, .. }
        | Constant { warmup_steps } => warmup_steps,
    }
}

/// UTF-8 bytes per target token over the eval set, for bits per byte.
fn bytes_per_token(dataset: &Dataset, eval_set: &[Batch]) -> f64 {
    let mut bytes = 0usize;
    let mut tokens = 0usize;
    for batch in eval_set {
        let ids: Vec<u32> = batch.targets.iter().map(|&t| t as u32).collect();
        // Separators stand for document boundaries, not text: count the text's bytes only.
        bytes += dataset
            .tokenizer
            .decode_text(&ids)
            .map(|s| s.len())
            .unwrap_or(0);
        tokens += ids.len();
    }
    if tokens == 0 {
        1.0
    } else {
        bytes as f64 / tokens as f64
    }
}

/// Reads a JSON file of a checkpoint; an unreadable one is named, an invalid one said so.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read(path).map_err(Error::io(format!("reading {}", path.display())))?;
    serde_json::from_slice(&text).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        why: format!("not valid: {e}"),
    })
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_vec_pretty(value).expect("serializes");
    std::fs::write(path, text).map_err(Error::io(format!("writing {}", path.display())))
}

/// The gradient exchange among the workers on `devices`: NCCL when every device is a GPU and the
/// `nccl` feature is built, else the in-process reducer (which also works across GPUs, through
/// copies).
fn gradient_reducer(
    devices: &[Device],
    timeout: std::time::Duration,
) -> Result<Arc<dyn BucketReducer>> {
    #[cfg(feature = "nccl")]
    {
        let gpus: Vec<usize> = devices
            .iter()
            .filter_map(|d| match d {
                Device::Cuda(i) => Some(*i),
                _ => None,
            })
            .collect();
        if gpus.len() == devices.len() {
            let reducer = crate::parallel::NcclReducer::new(&gpus, timeout)?;
            tracing::info!("data parallelism over {gpus:?} with NCCL");
            return Ok(Arc::new(reducer));
        }
    }
    Ok(Arc::new(LocalReducer::new(devices.len(), timeout)))
}

/// Loads the model of a checkpoint directory (for `forge-node sample`).
pub fn load_checkpoint_model(dir: &Path, device: Device) -> Result<(VarStore, Model, TrainState)> {
    crate::checkpoint::verify(dir)?;
    let state: TrainState = read_json(&dir.join("state.json"))?;
    let mut vs = VarStore::new(device);
    let model = {
        let _rng = crate::rng();
        Model::new(&vs.root(), &state.model)?
    };
    weights::load(&mut vs, &state.model, &dir.join("model.safetensors"))?;
    Ok((vs, model, state))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(values: &[&[f32]]) -> Vec<(Tensor, tch::Kind)> {
        values
            .iter()
            .map(|v| (Tensor::from_slice(v), tch::Kind::Float))
            .collect()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t).unwrap()
    }

    /// The staging buffers (pinned on a GPU; plain host memory here, where only the reuse is
    /// under test) are reused only when no snapshot still holds them: a writer that has not
    /// finished never sees its tensors overwritten by the next snapshot.
    #[test]
    fn staging_buffers_are_reused_only_when_no_writer_holds_them() {
        let mut staging = Staging::default();
        let (first, lease) = staging.copy(None, &sources(&[&[1.0, 2.0], &[3.0]]));
        let first_ptr = first[0].data_ptr();
        // Still held (the first writer runs): the next snapshot goes elsewhere.
        let (second, second_lease) = staging.copy(None, &sources(&[&[5.0, 6.0], &[7.0]]));
        assert_ne!(second[0].data_ptr(), first_ptr);
        assert_eq!(
            values(&first[0]),
            [1.0, 2.0],
            "a held snapshot was overwritten"
        );
        assert_eq!(values(&second[0]), [5.0, 6.0]);
        drop((first, lease));
        // The cache is now the second snapshot's buffers, still held.
        let second_ptr = second[0].data_ptr();
        let (third, third_lease) = staging.copy(None, &sources(&[&[8.0, 9.0], &[10.0]]));
        assert_ne!(third[0].data_ptr(), second_ptr);
        assert_eq!(values(&second[0]), [5.0, 6.0]);
        drop((second, second_lease));
        let third_ptr = third[0].data_ptr();
        drop((third, third_lease));
        // Released: reused in place, with the new values.
        let (fourth, _lease) = staging.copy(None, &sources(&[&[11.0, 12.0], &[13.0]]));
        assert_eq!(fourth[0].data_ptr(), third_ptr);
        assert_eq!(values(&fourth[0]), [11.0, 12.0]);
        assert_eq!(values(&fourth[1]), [13.0]);
    }

    #[test]
    fn staging_buffers_follow_a_change_of_shape_or_kind() {
        let mut staging = Staging::default();
        let (first, lease) = staging.copy(None, &sources(&[&[1.0, 2.0]]));
        let ptr = first[0].data_ptr();
        drop((first, lease));
        let (grown, lease) = staging.copy(None, &sources(&[&[1.0, 2.0, 3.0]]));
        assert_ne!(grown[0].data_ptr(), ptr);
        assert_eq!(values(&grown[0]), [1.0, 2.0, 3.0]);
        drop((grown, lease));
        let step = [(Tensor::from_slice(&[7i64]), tch::Kind::Int64)];
        let (copies, _lease) = staging.copy(None, &step);
        assert_eq!(copies[0].kind(), tch::Kind::Int64);
        assert_eq!(Vec::<i64>::try_from(&copies[0]).unwrap(), [7]);
    }
}
