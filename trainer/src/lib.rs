//! forge-trainer: everything that touches tensors. The models, the data they read, the inner
//! and outer optimizers, data parallelism inside a node, checkpoints, and the training loop that
//! `forge-node` runs alone or between DiLoCo outer steps.

/// Train-step benchmark (forward, backward, clip, AdamW), compared with PyTorch in one run.
pub mod bench;
/// Checkpoint directories: written atomically with a manifest last, verified, rotated.
pub mod checkpoint;
/// Run configs: complete TOML files from `configs/`, unknown keys refused, validated once.
pub mod config;
/// `forge-node control` of a running `forge-node train`: request and answer files, the run's
/// lock.
pub mod control;
/// Corpus files to tokenizer, memory-mapped token cache, shuffled shards and eval windows.
pub mod data;
/// `--device` strings (`cpu`, `cuda`, `cuda:N`, lists) parsed and checked.
pub mod device;
/// DiLoCo outer state: fp32 global parameters, Nesterov momentum, pseudo-gradients, hashes.
pub mod diloco;
/// Errors and the crate's `Result`.
mod error;
/// Hugging Face export: a checkpoint as a folder `transformers` loads (weights, config, tokenizer).
pub mod export;
/// Peak throughput of known accelerators, for model FLOPs utilisation.
pub mod flops;
/// The decoders of files this crate reads, under the workspace's mutation fuzzer.
#[cfg(test)]
mod fuzz_tests;
/// Hugging Face import: `[model] init_from` folders' weights, and the check of their files.
pub mod import;
/// Run metrics: `metrics.jsonl` lines and the progress a person watching sees.
pub mod metrics;
/// The model zoo: one file per family, presets, Hugging Face parameter names.
pub mod models;
/// Inner optimizers (AdamW, Muon, Adafactor) with explicit state, and global-norm gradient clipping.
pub mod optim;
/// DiLoCo's outer state as checkpointed, served and checked against the committed hashes.
pub mod outer_state;
/// Data parallelism inside a node: one worker per device, gradients summed every step.
pub mod parallel;
/// Pipeline stages: a replica's layers split across nodes, GPipe micro-batches, the links
/// between stages.
pub mod pipeline;
/// Seeded text generation: temperature and top-k sampling.
pub mod sample;
/// Learning-rate schedules: warmup + cosine, WSD, InfiniteLR, batch-size scaling.
pub mod schedule;
/// The training loop: accumulation, eval, samples, checkpoints with exact resume, Ctrl-C.
pub mod train;

pub use error::{Error, Result};

/// Guards libtorch's process-wide random generator: whoever seeds it holds this until the
/// last draw that must be reproducible (model initialisation, seeded sampling).
static GLOBAL_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Holds libtorch's process-wide random generator (see [`GLOBAL_RNG`]): every draw from it in
/// this crate, seeded or not, happens under this guard, so none perturbs another's sequence.
pub(crate) fn rng() -> std::sync::MutexGuard<'static, ()> {
    GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner())
}
