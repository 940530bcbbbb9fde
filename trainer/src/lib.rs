//! forge-trainer: everything that touches tensors. Models (one file per family), the inner
//! optimizer, devices, and the train-step benchmark.

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod device;
mod error;
pub mod flops;
pub mod metrics;
pub mod models;
pub mod optim;
pub mod sample;
pub mod schedule;

pub use error::{Error, Result};
