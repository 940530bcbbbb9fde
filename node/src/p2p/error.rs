//! Errors of the peer-to-peer layer: setting it up, and a failed all-reduce with the peer to blame.

use std::path::PathBuf;
use std::time::Duration;

use libp2p::PeerId;

/// Setting up the swarm, the node identity, or talking to an event loop that has stopped.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error("cannot {action} the node key {path}: {source}; check the workdir's permissions")]
    KeyFile {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },

    #[error(
        "node key {path} is not a valid ed25519 key ({reason}); move it away to create a new identity (the coordinator will see a new peer id)"
    )]
    KeyDecode { path: PathBuf, reason: String },

    #[error("node key {path} can be read by other users (mode {mode:o}); run `chmod 600 {path}`")]
    KeyPermissions { path: PathBuf, mode: u32 },

    #[error("invalid peer-to-peer setup: {0}")]
    Config(String),

    #[error("cannot listen on {addr}: {reason}; pick another address or port")]
    Listen { addr: String, reason: String },

    #[error("the peer-to-peer event loop has stopped; the node is shutting down")]
    Stopped,

    #[error("pipeline: {0}")]
    Pipeline(String),
}

/// Why an owner refused a contribution (or an all-gather chunk) from a peer.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub(crate) enum RejectReason {
    #[error("it is in round {found}, this member in round {expected}")]
    WrongRound { expected: u64, found: u64 },

    #[error("its vector has {found} values, this member's {expected}")]
    WrongLength { expected: u64, found: u64 },

    #[error("it encodes with {found}, this member with {expected}")]
    WrongCodec { expected: String, found: String },

    #[error("chunk header does not fit this all-reduce: {0}")]
    Header(String),

    #[error("payload does not decode: {0}")]
    Decode(String),

    #[error("value {value} at element {index} is not finite")]
    NonFinite { index: u64, value: f32 },

    #[error("norm per unit of weight {norm:.3e} is more than {ratio}x the median {median:.3e}")]
    Outlier { norm: f64, median: f64, ratio: f64 },

    #[error("it claims a weight of {weight}, more than the {cap} its replica's data lease allows")]
    Overweight { weight: f64, cap: f64 },

    #[error(
        "its contribution to this member's range has norm {norm:.3e}, more than the {declared:.3e} \
         it declared for its whole contribution"
    )]
    AboveDeclared { norm: f64, declared: f64 },

    #[error(
        "its reduced range has norm {norm:.3e}, more than its inputs allow ({bound:.3e}: \
         {slack}x the sum of the declared contribution norms over the total weight)"
    )]
    ResultAboveInputs { norm: f64, bound: f64, slack: f64 },
}

/// A failed all-reduce. It never leaves a partial result behind: on error the caller keeps its
/// parameters and reports the named peer to the coordinator.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AllReduceError {
    #[error("invalid all-reduce request: {0}")]
    InvalidRequest(String),

    #[error("round {round}: rejected the contribution of {peer}: {reason}")]
    Rejected {
        round: u64,
        peer: PeerId,
        reason: RejectReason,
    },

    #[error("round {round}: peer {peer} failed: {reason}")]
    PeerFailed {
        round: u64,
        peer: PeerId,
        reason: String,
    },

    #[error(
        "round {round}: gave up on peer {peer} after {waited:?} ({detail}); it is down, stalled or too slow for the timeout"
    )]
    Timeout {
        round: u64,
        peer: PeerId,
        waited: Duration,
        detail: String,
    },

    #[error("round {round}: peer {by} abandoned the all-reduce, blaming {blamed}: {reason}")]
    Aborted {
        round: u64,
        by: PeerId,
        blamed: PeerId,
        reason: String,
    },

    #[error("round {round}: this node's codec failed: {reason}")]
    Codec { round: u64, reason: String },

    #[error("the peer-to-peer event loop has stopped; the node is shutting down")]
    Stopped,

    /// Given up by this node, blaming nobody (the run was aborted).
    #[error("the all-reduce was given up: {0}")]
    GivenUp(String),
}

impl AllReduceError {
    /// The peer the failure is attributed to, for the report to the coordinator.
    pub(crate) fn peer(&self) -> Option<PeerId> {
        match self {
            AllReduceError::Rejected { peer, .. }
            | AllReduceError::PeerFailed { peer, .. }
            | AllReduceError::Timeout { peer, .. }
            | AllReduceError::Aborted { blamed: peer, .. } => Some(*peer),
            AllReduceError::InvalidRequest(_)
            | AllReduceError::Codec { .. }
            | AllReduceError::Stopped
            | AllReduceError::GivenUp(_) => None,
        }
    }
}

pub(crate) type Result<T, E = Error> = std::result::Result<T, E>;
