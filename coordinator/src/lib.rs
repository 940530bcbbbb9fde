//! Forge coordinator: the membership and round state machine, the pipeline stage planner and
//! the model profiles it plans with. The network shell drives [`Coordinator`] and does all I/O.

/// The coordinator state machine: membership, assignment, rounds, checkpoints. No I/O.
pub mod core;
/// Errors and the crate's `Result`.
pub mod error;
/// Pipeline stage planner: model profile + nodes → replicas × stages.
pub mod planner;
/// Model profiles (presets, TOML) and node profiles (TOML, join capabilities).
pub mod profile;

#[cfg(test)]
mod sim;

pub use crate::core::{ConnId, Coordinator, CoordinatorConfig, Event, Input, Millis, Output};
pub use crate::error::{Error, Result};
pub use crate::planner::{ModelProfile, NodeProfile, Plan, plan, rebalance};
