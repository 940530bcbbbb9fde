//! Wire types of the peer-to-peer DiLoCo all-reduce: the header that precedes each chunk.
//!
//! A sync stream carries, per chunk, one [`Channel::Sync`](crate::codec::Channel::Sync) frame
//! holding a [`SyncChunkHeader`], then exactly `payload_len` raw bytes of encoded pseudo_grad.
//! The receiver decodes the header, calls [`SyncChunkHeader::check`], and only then reads the
//! payload.

use serde::{Deserialize, Serialize};

use crate::codec::{self, Channel};
use crate::error::{Error, Result};
use crate::messages::{MemberId, RoundId};

/// Protocol id of the sync stream, in the libp2p style.
pub const SYNC_PROTOCOL: &str = "/forge/sync/1";

/// Largest chunk payload a receiver accepts.
pub const MAX_SYNC_CHUNK_BYTES: u32 = 64 << 20;

/// How a chunk's pseudo_grad values are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncCodec {
    F32,
    Bf16,
    /// Blocks of `block` int8 values with one f32 scale each.
    Int8Blocks {
        block: u32,
    },
    /// Blocks of `block` 4-bit E3M0 values with one f32 scale each.
    E3m0Blocks {
        block: u32,
    },
}

/// Which half of the reduce-scatter + all-gather all-reduce a chunk belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncPhase {
    ReduceScatter,
    AllGather,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncChunkHeader {
    pub round: RoundId,
    pub sender: MemberId,
    /// Pipeline stage whose parameters the chunk covers (0 for whole-model replicas).
    pub stage: u32,
    pub phase: SyncPhase,
    pub chunk_index: u32,
    pub chunks: u32,
    pub codec: SyncCodec,
    /// Raw bytes that follow the header frame.
    pub payload_len: u32,
    /// The payload is additionally zstd-compressed.
    pub zstd: bool,
}

impl SyncChunkHeader {
    /// Validates the fields a receiver relies on before it reads or allocates the payload.
    pub fn check(&self) -> Result<()> {
        if self.payload_len > MAX_SYNC_CHUNK_BYTES {
            return Err(Error::PayloadTooLarge {
                kind: "sync chunk",
                len: self.payload_len.into(),
                max: MAX_SYNC_CHUNK_BYTES.into(),
            });
        }
        if self.chunk_index >= self.chunks {
            return Err(Error::InvalidSyncHeader {
                reason: format!(
                    "chunk index {} is not below the chunk count {}",
                    self.chunk_index, self.chunks
                ),
            });
        }
        if let SyncCodec::Int8Blocks { block: 0 } | SyncCodec::E3m0Blocks { block: 0 } = self.codec
        {
            return Err(Error::InvalidSyncHeader {
                reason: "block size 0".to_string(),
            });
        }
        Ok(())
    }

    pub fn to_frame(&self) -> Result<Vec<u8>> {
        codec::encode(Channel::Sync, self)
    }

    /// Decodes and checks a header frame.
    pub fn from_frame(frame: &[u8]) -> Result<SyncChunkHeader> {
        let header: SyncChunkHeader = codec::decode(Channel::Sync, frame)?;
        header.check()?;
        Ok(header)
    }
}
