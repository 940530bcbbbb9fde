//! Forge coordinator client: the node's side of the control connection and what it shares with
//! the coordinator (cluster token, certificate pinning, control frames). A crate of its own so a
//! node's dependency tree holds no coordinator server, state database or certificate generator.

/// The node's side of the control connection: join, heartbeats, reports, reconnects.
pub mod client;
/// Errors and the crate's `Result`.
pub mod error;
/// Cluster token, certificate fingerprint and pinning, the client's QUIC config.
pub mod tls;
/// Length-prefixed control frames on QUIC streams.
pub mod wire;

pub use crate::client::{
    ClientOptions, CoordinatorClient, Notification, fetch_status, prove_identity, send_control,
};
pub use crate::error::{Error, Result};
pub use crate::tls::ClusterToken;
