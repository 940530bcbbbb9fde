//! Forge wire protocol: the messages nodes and the coordinator exchange, the messages of the
//! peer-to-peer sync and state-transfer streams, the keys and digest of state tensors, the
//! single codec that frames and serializes them, the quantisers that compress outer gradients,
//! and the run config and model vocabulary both sides read. No I/O.

/// Framing, size limits, bincode and zstd: the only module that serializes anything.
pub mod codec;
/// The digest of a state tensor (SHA-256 of its f32 values), one definition for every side.
pub mod digest;
/// Errors and the crate's `Result`.
pub mod error;
/// The time-bounded mutation fuzzer every crate's decoder tests run.
pub mod fuzz;
/// Control messages between node and coordinator, and the version handshake.
pub mod messages;
/// Model families, presets, configs and their analytic parameter, FLOP and memory counts.
pub mod model;
/// Headers of the messages between pipeline stages (activations forward, their gradients back).
pub mod pipeline;
/// Outer-gradient codecs (fp32, bf16, block int8/int4, top-k, optional zstd) and error feedback.
pub mod quant;
/// SplitMix64, the seeded generator whose outputs must never change.
pub mod rng;
/// The run config schema (every table, defaults, validation), parsed from text.
pub mod run_config;
/// The opening exchange of a control connection (cluster token) and the status report.
pub mod session;
/// Requests and answers of the peer-to-peer state transfer to joining nodes.
pub mod state;
/// The training stream's positions and the ranges of it the coordinator leases to replicas.
pub mod stream;
/// Headers of the peer-to-peer DiLoCo all-reduce stream.
pub mod sync;

#[cfg(test)]
mod fuzz_tests;

pub use error::{Error, Result};
pub use messages::{
    Activity, Assigned, Assignment, Capabilities, CheckpointCommitted, CheckpointRequest,
    CheckpointShardDurable, CheckpointShardFailed, CoordinatorMessage, DataShard, Device,
    DeviceKind, Digest, ErrorCode, ErrorReply, F64Bits, GlobalState, Heartbeat, Hello,
    InitialState, Join, JoinAccepted, LayerRange, Leave, MAX_PACED_ROUND, MemberDead, MemberId,
    NodeMessage, OuterStep, PROTOCOL_VERSION, Peer, PeersChanged, Ready, ReplicaId, RoundClosed,
    RoundId, RoundOpened, RoundOutcome, RoundReport, RoundSummary, RunAborted, RunPlan,
    ShardWriter, StageAssignment, TensorHash, TensorKey,
};
pub use run_config::{ConfigError, RunConfig};
pub use stream::{DataDigest, DataLease, SeqRange};
