//! forge-trainer: everything that touches tensors. Models (one file per family), the inner
//! optimizer, devices, DiLoCo's outer optimizer and its checkpointed and served state, and the
//! train-step benchmark.

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod device;
pub mod diloco;
mod error;
pub mod flops;
pub mod metrics;
pub mod models;
pub mod optim;
pub mod outer_state;
pub mod parallel;
pub mod sample;
pub mod schedule;
pub mod train;

pub use error::{Error, Result};

/// Guards libtorch's process-wide random generator: whoever seeds it holds this until the
/// last draw that must be reproducible (model initialisation, seeded sampling).
pub(crate) static GLOBAL_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
