//! Forge coordinator: the membership and round state machine, the pipeline stage planner and
//! the model profiles it plans with, and the network shell (server, state database) that drives
//! the state machine over QUIC. The node's side of the connection is the
//! `forge-coordinator-client` crate, re-exported here as [`client`].

/// The node's side of the control connection (the `forge-coordinator-client` crate).
pub use forge_coordinator_client as client;
/// The coordinator state machine: membership, assignment, rounds, checkpoints. No I/O.
pub mod core;
/// What the dashboard shows beyond the status: members' activity, round curves, members gone.
pub mod dashboard;
/// The training stream's ledger: leases per round, consumed and returned positions.
pub mod data;
/// Errors and the crate's `Result`.
pub mod error;
/// The dashboard, its JSON and Prometheus metrics over HTTP (axum).
mod http;
/// Peer ids: the check at join, and stable ids for simulated members.
pub mod identity;
/// Fixed-size latency histogram for the server's statistics.
pub mod latency;
/// Pipeline stage planner: model profile + nodes → replicas × stages.
pub mod planner;
/// Model profiles (presets, TOML) and node profiles (TOML, join capabilities).
pub mod profile;
/// The run config as the coordinator reads it: validated whole, its `[coordinator]` table applied.
pub mod run_config;
/// The QUIC server: connection tasks and the event loop that owns the core and the database.
pub mod server;
/// Durable state in redb: identity, snapshot, round history.
mod store;
/// Self-signed certificate, server endpoint, token secret check.
mod tls;

#[cfg(test)]
mod control_tests;
#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
mod sim;

pub use crate::core::{
    ConnId, Coordinator, CoordinatorConfig, Event, Input, Limits, MemberView, Millis, Output,
};
pub use crate::error::{Error, Result};
pub use crate::planner::{ModelProfile, NodeProfile, Plan, plan, rebalance};
pub use crate::server::{Server, ServerStats, Startup};
pub use forge_coordinator_client::{
    ClientOptions, ClusterToken, CoordinatorClient, Notification, fetch_status, send_control,
};
