//! Wire types of the pipeline stream between the stages of one replica: activations go forward,
//! their gradients come back, the two ends of a tied embedding swap its gradient, and every stage
//! adds its scalars (the squared gradient norm, the loss) to everyone's.
//!
//! Each message is one [`Channel::Pipeline`](crate::codec::Channel::Pipeline) frame holding a
//! [`StageHeader`], then exactly `payload_len` raw bytes: the tensor's values, little-endian, in
//! the header's dtype and shape. The receiver decodes the header, calls [`StageHeader::check`]
//! (which bounds the payload before anything is allocated), then reads the payload.
//!
//! Layer numbers of a stage ([`LayerRange`]) count the planner's layers: 0 is the embeddings,
//! 1..=n_layer the transformer blocks, n_layer + 1 the final norm and output head.

use serde::{Deserialize, Serialize};

use crate::codec::{self, Channel};
use crate::error::{Error, Result};
use crate::messages::LayerRange;

/// Protocol id of the pipeline stream, in the libp2p style.
pub const PIPELINE_PROTOCOL: &str = "/forge/pipeline/1";

/// Largest tensor payload a receiver accepts (a 1 GiB activation is 16 sequences of 4,096 tokens
/// at d = 4,096 in fp32).
pub const MAX_STAGE_TENSOR_BYTES: u64 = 1 << 30;

/// Most dimensions a tensor on the pipeline stream has ((batch, tokens, d) for activations).
pub const MAX_STAGE_TENSOR_DIMS: usize = 4;

/// What a message carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StageKind {
    /// The output of the sending stage for micro-batch `micro`: the next stage's input.
    Activation,
    /// The loss's gradient with respect to the receiving stage's output for `micro`.
    Gradient,
    /// The sender's gradient of the tied embedding (first and last stage swap theirs).
    TiedGradient,
    /// The first stage's tied embedding, which the last stage's copy takes (after an outer
    /// step, the first stage's global state sets it).
    TiedParameters,
    /// The sender's scalars of the step, added up by every stage.
    Scalars,
}

/// How the payload's values are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StageDtype {
    F32,
    Bf16,
}

impl StageDtype {
    pub const fn bytes(self) -> u64 {
        match self {
            StageDtype::F32 => 4,
            StageDtype::Bf16 => 2,
        }
    }
}

/// Precedes every tensor on a pipeline stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageHeader {
    /// The optimizer step the message belongs to.
    pub step: u64,
    /// The micro-batch within the step (0 for tied gradients and scalars).
    pub micro: u32,
    pub kind: StageKind,
    pub dtype: StageDtype,
    pub shape: Vec<u64>,
    /// Raw bytes that follow the header frame: the product of `shape` times the dtype's size.
    pub payload_len: u64,
}

impl StageHeader {
    /// A header for a tensor of `shape` in `dtype`, its payload length computed.
    pub fn new(step: u64, micro: u32, kind: StageKind, dtype: StageDtype, shape: Vec<u64>) -> Self {
        let values = shape
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .unwrap_or(u64::MAX);
        StageHeader {
            step,
            micro,
            kind,
            dtype,
            shape,
            payload_len: values.saturating_mul(dtype.bytes()),
        }
    }

    /// Validates what a receiver relies on before it reads or allocates the payload.
    pub fn check(&self) -> Result<()> {
        let bad = |reason: String| Err(Error::InvalidStageHeader { reason });
        if self.shape.len() > MAX_STAGE_TENSOR_DIMS {
            return bad(format!(
                "{} dimensions, at most {MAX_STAGE_TENSOR_DIMS}",
                self.shape.len()
            ));
        }
        let bytes = self
            .shape
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .and_then(|n| n.checked_mul(self.dtype.bytes()));
        match bytes {
            Some(bytes) if bytes > MAX_STAGE_TENSOR_BYTES => Err(Error::PayloadTooLarge {
                kind: "pipeline tensor",
                len: bytes,
                max: MAX_STAGE_TENSOR_BYTES,
            }),
            Some(bytes) if bytes == self.payload_len => Ok(()),
            _ => bad(format!(
                "shape {:?} in {:?} does not make {} bytes",
                self.shape, self.dtype, self.payload_len
            )),
        }
    }

    pub fn to_frame(&self) -> Result<Vec<u8>> {
        codec::encode(Channel::Pipeline, self)
    }

    /// Decodes and checks a header frame.
    pub fn from_frame(frame: &[u8]) -> Result<StageHeader> {
        let header: StageHeader = codec::decode(Channel::Pipeline, frame)?;
        header.check()?;
        Ok(header)
    }
}

impl LayerRange {
    /// All `n_layer + 2` planner layers: a whole model.
    pub fn whole(n_layer: u32) -> LayerRange {
        LayerRange {
            start: 0,
            end: n_layer + 2,
        }
    }

    /// The `n_layer + 2` planner layers cut into `stages` ranges of near-equal length.
    pub fn even_split(n_layer: u32, stages: u32) -> Vec<LayerRange> {
        let total = n_layer + 2;
        (0..stages)
            .map(|s| LayerRange {
                start: s * total / stages,
                end: (s + 1) * total / stages,
            })
            .collect()
    }

    /// Whether the range holds the embeddings (planner layer 0).
    pub fn has_embedding(&self) -> bool {
        self.start == 0
    }

    /// Whether the range holds the final norm and head (planner layer `n_layer + 1`).
    pub fn has_head(&self, n_layer: u32) -> bool {
        self.end == n_layer + 2
    }

    /// The transformer blocks the range holds, as block indices.
    pub fn blocks(&self, n_layer: u32) -> std::ops::Range<u32> {
        let start = self.start.max(1) - 1;
        let end = self.end.min(n_layer + 1).saturating_sub(1);
        start..end.max(start)
    }

    /// Explains why the range is no stage of a model of `n_layer` blocks.
    pub fn check(&self, n_layer: u32) -> Result<()> {
        if self.start >= self.end || self.end > n_layer + 2 {
            return Err(Error::InvalidStageHeader {
                reason: format!(
                    "layers {}..{} are no stage of a model with {} planner layers (embeddings, {n_layer} blocks, head)",
                    self.start,
                    self.end,
                    n_layer + 2
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_round_trips_and_its_payload_is_bounded_by_its_shape() {
        let header = StageHeader::new(
            7,
            3,
            StageKind::Activation,
            StageDtype::Bf16,
            vec![2, 64, 128],
        );
        assert_eq!(header.payload_len, 2 * 64 * 128 * 2);
        let back = StageHeader::from_frame(&header.to_frame().unwrap()).unwrap();
        assert_eq!(back, header);

        let mut lying = header.clone();
        lying.payload_len += 1;
        let err = StageHeader::from_frame(&lying.to_frame().unwrap()).unwrap_err();
        assert!(err.to_string().contains("does not make"), "{err}");
        let huge = StageHeader::new(
            0,
            0,
            StageKind::Gradient,
            StageDtype::F32,
            vec![1 << 20, 1 << 20],
        );
        let err = StageHeader::from_frame(&huge.to_frame().unwrap()).unwrap_err();
        assert!(matches!(err, Error::PayloadTooLarge { .. }), "{err}");
        let overflow = StageHeader {
            shape: vec![u64::MAX, 3],
            ..header.clone()
        };
        assert!(overflow.check().is_err());
        let deep = StageHeader::new(0, 0, StageKind::Scalars, StageDtype::F32, vec![1; 5]);
        assert!(deep.check().is_err());
    }

    #[test]
    fn planner_layers_map_to_embeddings_blocks_and_head() {
        let n = 4;
        let whole = LayerRange::whole(n);
        assert!(whole.has_embedding() && whole.has_head(n));
        assert_eq!(whole.blocks(n), 0..4);
        let first = LayerRange { start: 0, end: 3 };
        assert!(first.has_embedding() && !first.has_head(n));
        assert_eq!(first.blocks(n), 0..2);
        let last = LayerRange { start: 3, end: 6 };
        assert!(!last.has_embedding() && last.has_head(n));
        assert_eq!(last.blocks(n), 2..4);
        let embed_only = LayerRange { start: 0, end: 1 };
        assert_eq!(embed_only.blocks(n), 0..0);
        let head_only = LayerRange { start: 5, end: 6 };
        assert_eq!(head_only.blocks(n), 4..4);
        assert!(LayerRange { start: 2, end: 7 }.check(n).is_err());
        assert!(LayerRange { start: 2, end: 2 }.check(n).is_err());
        assert!(last.check(n).is_ok());
    }
}
