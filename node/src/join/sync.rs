//! The node's side of the all-reduce: its codec (the run's compression, with error feedback)
//! and how a failed all-reduce reads to the round state machine.

use crate::p2p::{AllReduceError, ChunkCodec};
use crate::round::ReduceFailure;
use forge_protocol::messages::RoundId;
use forge_protocol::quant::{self, Compression, ErrorFeedback};
use forge_protocol::sync::SyncCodec;

/// The error of an all-reduce given up because the coordinator declared a participant gone.
pub(super) fn declared_gone(round: RoundId, peer: &str, reason: &str) -> AllReduceError {
    match peer.parse() {
        Ok(peer) => AllReduceError::PeerFailed {
            round: round.0,
            peer,
            reason: format!("the coordinator declared it gone: {reason}"),
        },
        Err(_) => {
            AllReduceError::InvalidRequest(format!("participant peer id {peer} does not parse"))
        }
    }
}

/// A failed all-reduce as the state machine sees it: why, and whom it blames.
pub(super) fn failure_of(e: &AllReduceError, sync_s: f64) -> ReduceFailure {
    ReduceFailure {
        reason: e.to_string(),
        peer: e.peer().map(|p| p.to_string()),
        rejected: matches!(e, AllReduceError::Rejected { .. }),
        sync_s,
    }
}

/// The node's codec: the run's compression, with error feedback over the whole flattened
/// pseudo-gradient (chunks are ranges of it).
pub(super) struct QuantCodec {
    pub(super) compression: Compression,
    pub(super) feedback: ErrorFeedback,
}

impl ChunkCodec for QuantCodec {
    fn encode_contribution(
        &mut self,
        offset: usize,
        x: &[f32],
        out: &mut Vec<u8>,
    ) -> forge_protocol::Result<()> {
        self.feedback.compress_at(offset, x, out)
    }

    fn encode_result(&self, x: &[f32], out: &mut Vec<u8>) -> forge_protocol::Result<()> {
        quant::encode_into(x, &self.compression, out)
    }

    fn decode_into(&self, bytes: &[u8], out: &mut [f32]) -> forge_protocol::Result<()> {
        quant::decode_into(bytes, out, &self.compression)
    }

    fn id(&self) -> (SyncCodec, bool) {
        self.compression.sync_codec()
    }
}
