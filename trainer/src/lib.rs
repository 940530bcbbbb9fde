//! forge-trainer: everything that touches tensors. Models (one file per family), the inner
//! optimizer, devices, and the train-step benchmark.

pub mod bench;
pub mod config;
pub mod device;
mod error;
pub mod flops;
pub mod models;
pub mod optim;

pub use error::{Error, Result};
