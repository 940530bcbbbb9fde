//! Wire types of the peer-to-peer DiLoCo all-reduce: the header that precedes each chunk.
//!
//! A sync stream carries, per chunk, one [`Channel::Sync`](crate::codec::Channel::Sync) frame
//! holding a [`SyncChunkHeader`], then exactly `payload_len` raw bytes of encoded pseudo_grad.
//! The receiver decodes the header, calls [`SyncChunkHeader::check`], and only then reads the
//! payload.

use serde::{Deserialize, Serialize};

use crate::codec::{self, Channel};
use crate::error::{Error, Result};
use crate::messages::RoundId;
use crate::quant::Codec;

/// Protocol id of the sync stream, in the libp2p style.
pub const SYNC_PROTOCOL: &str = "/forge/sync/1";

/// Largest chunk payload a receiver accepts.
pub const MAX_SYNC_CHUNK_BYTES: u32 = 64 << 20;

/// How a chunk's pseudo_grad values are encoded: the wire id of a [`Codec`]
/// ([`Compression::sync_codec`](crate::quant::Compression::sync_codec)). Variants are only
/// appended, so the earlier ones keep their wire tags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncCodec {
    F32,
    Bf16,
    /// Blocks of `block` int8 values with one f32 scale each.
    Int8Blocks {
        block: u32,
    },
    /// Blocks of `block` symmetric absmax int4 values with one f32 scale each.
    Int4Blocks {
        block: u32,
    },
    /// Blocks of `block` values of which the `k` largest travel, each as its index and a
    /// `bits`-bit code, with one f32 scale per block.
    TopK {
        block: u32,
        k: u32,
        bits: u8,
    },
}

/// Which half of the reduce-scatter + all-gather all-reduce a chunk belongs to, or an abort.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncPhase {
    ReduceScatter,
    AllGather,
    /// The sender gave up on this all-reduce: `owner` is the member it blames and the
    /// payload is the reason in UTF-8, so the others fail at once instead of at their timeout.
    Abort,
}

/// Precedes every chunk on a sync stream. A chunk holds `values` consecutive elements of the
/// flattened pseudo_grad, starting at `offset`, all inside the range owned by member `owner`
/// (the all-reduce splits the vector into `members` ranges, one per member).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SyncChunkHeader {
    pub round: RoundId,
    /// Digest of the ordered member list of this all-reduce, so that streams of an earlier
    /// attempt at the same round (with other members) are never mixed into a retry.
    pub group: u64,
    /// The sender's position in that member list; the transport authenticates who it is.
    pub sender: u32,
    /// Pipeline stage whose parameters the chunk covers (0 for whole-model replicas).
    pub stage: u32,
    pub phase: SyncPhase,
    /// The member that reduces the range this chunk lies in: the receiver in the reduce-scatter,
    /// the sender in the all-gather, the blamed member in an abort. Below `members`.
    pub owner: u32,
    /// Members in this all-reduce (the length of the ordered member list `group` digests),
    /// which is also the number of owned ranges the vector is split into.
    pub members: u32,
    /// First element of the chunk in the flattened pseudo_grad.
    pub offset: u64,
    /// Elements the payload decodes to.
    pub values: u32,
    /// Elements in the whole flattened pseudo_grad; every member must agree.
    pub total_len: u64,
    /// Reduce-scatter: the sender's weight (tokens processed). All-gather: the total weight the
    /// owner divided the sum by.
    pub weight: f64,
    /// Reduce-scatter: the norm of the sender's whole contribution (the same in every chunk it
    /// sends anyone), which bounds what an owner's reduced range may hold. All-gather, in the
    /// owner's last chunk of its range: the sum over members of the squares of each one's
    /// contribution to the range divided by its weight (how far the members' pseudo-gradients
    /// reach, which the outer step may depend on). Otherwise 0.
    pub norm: f64,
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
        if self.owner >= self.members {
            return Err(Error::InvalidSyncHeader {
                reason: format!(
                    "owner {} is not below the member count {}",
                    self.owner, self.members
                ),
            });
        }
        if self.sender >= self.members {
            return Err(Error::InvalidSyncHeader {
                reason: format!(
                    "sender {} is not below the member count {}",
                    self.sender, self.members
                ),
            });
        }
        let end = self.offset.checked_add(u64::from(self.values));
        if end.is_none_or(|end| end > self.total_len) {
            return Err(Error::InvalidSyncHeader {
                reason: format!(
                    "values {}..+{} run past the vector length {}",
                    self.offset, self.values, self.total_len
                ),
            });
        }
        if !(self.weight.is_finite() && self.weight > 0.0) {
            return Err(Error::InvalidSyncHeader {
                reason: format!("weight {} is not a positive finite number", self.weight),
            });
        }
        if !(self.norm.is_finite() && self.norm >= 0.0) {
            return Err(Error::InvalidSyncHeader {
                reason: format!("norm {} is not a finite number >= 0", self.norm),
            });
        }
        let blocks = match self.codec {
            SyncCodec::F32 | SyncCodec::Bf16 => None,
            SyncCodec::Int8Blocks { block } => Some(Codec::Int8 { block_size: block }),
            SyncCodec::Int4Blocks { block } => Some(Codec::Int4 { block_size: block }),
            SyncCodec::TopK { block, k, bits } => Some(Codec::TopK {
                block_size: block,
                k,
                bits,
            }),
        };
        if let Some(codec) = blocks {
            codec.validate().map_err(|err| Error::InvalidSyncHeader {
                reason: err.to_string(),
            })?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> SyncChunkHeader {
        SyncChunkHeader {
            round: RoundId(3),
            group: 0xfeed,
            sender: 1,
            stage: 0,
            phase: SyncPhase::AllGather,
            owner: 2,
            members: 3,
            offset: 10,
            values: 5,
            total_len: 15,
            weight: 1024.0,
            norm: 0.0,
            codec: SyncCodec::Bf16,
            payload_len: 10,
            zstd: false,
        }
    }

    #[test]
    fn valid_header_round_trips() {
        let frame = header().to_frame().unwrap();
        assert_eq!(SyncChunkHeader::from_frame(&frame).unwrap(), header());
    }

    #[test]
    fn values_past_the_vector_end_are_refused() {
        let past_end = SyncChunkHeader {
            values: 6,
            ..header()
        };
        let err = past_end.check().unwrap_err();
        assert!(
            err.to_string().contains("past the vector length 15"),
            "{err}"
        );
        let overflow = SyncChunkHeader {
            offset: u64::MAX,
            ..header()
        };
        assert!(overflow.check().is_err());
    }

    #[test]
    fn sender_outside_the_group_and_bad_weights_are_refused() {
        let sender = SyncChunkHeader {
            sender: 3,
            ..header()
        };
        assert!(sender.check().is_err());
        for weight in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let bad = SyncChunkHeader { weight, ..header() };
            let err = bad.check().unwrap_err();
            assert!(err.to_string().contains("weight"), "{err}");
        }
        for norm in [-1.0, f64::NAN, f64::INFINITY] {
            let bad = SyncChunkHeader { norm, ..header() };
            let err = bad.check().unwrap_err();
            assert!(err.to_string().contains("norm"), "{err}");
        }
    }

    #[test]
    fn topk_parameters_are_checked() {
        let topk = |block, k, bits| SyncChunkHeader {
            codec: SyncCodec::TopK { block, k, bits },
            ..header()
        };
        let frame = topk(4096, 64, 2).to_frame().unwrap();
        assert_eq!(
            SyncChunkHeader::from_frame(&frame).unwrap(),
            topk(4096, 64, 2)
        );
        for (bad, needle) in [
            (topk(32, 4, 2), "block size 32 of topk"),
            (topk(4096, 0, 2), "k = 0"),
            (topk(64, 65, 4), "k = 65"),
            (topk(4096, 64, 3), "bits = 3"),
        ] {
            let err = SyncChunkHeader::from_frame(&bad.to_frame().unwrap()).unwrap_err();
            assert!(matches!(err, Error::InvalidSyncHeader { .. }), "{err}");
            assert!(err.to_string().contains(needle), "{err}");
        }
    }
}
