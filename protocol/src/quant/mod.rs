//! Compression codecs for outer gradients (pseudo_grad): fp32, bf16, block int8 and block int4,
//! each optionally followed by zstd, plus error feedback for the lossy ones.
//!
//! Every encoded tensor is a self-describing blob, so a receiver that expects another codec or
//! another length refuses it with a clear error instead of decoding garbage:
//!
//! | bytes  | field                                                                  |
//! |--------|------------------------------------------------------------------------|
//! | 0..4   | magic `FGQT`                                                           |
//! | 4..6   | blob format version, u16 little-endian ([`BLOB_VERSION`])              |
//! | 6      | codec id: 0 fp32, 1 bf16, 2 int8, 3 int4                               |
//! | 7      | flags: bit 0 = body is one zstd frame; other bits zero                 |
//! | 8..12  | element count, u32 little-endian                                       |
//! | 12..16 | block size, u32 little-endian (0 for fp32 and bf16)                    |
//! | 16..   | body, possibly zstd-compressed                                         |
//!
//! Body layouts (all little-endian):
//! - fp32: the values' IEEE bits.
//! - bf16: the upper 16 bits of each value, rounded to nearest-even.
//! - int8: per block, an f32 scale (`absmax / 127`) then one i8 per value in -127..=127.
//! - int4: per block, an f32 scale (`absmax / 7`) then two values per byte in -7..=7, element
//!   `2i` in the low nibble; an odd final element leaves the high nibble zero.
//!
//! The last block may be shorter than the block size. The body length follows from the element
//! count and the codec, so decoding never allocates more than the caller's expected length
//! implies, whatever the header or the zstd frame claim.
//!
//! Determinism: the all-reduce needs every peer to decode the owner's bytes to bit-identical
//! f32 and the owner to produce the same bytes for the same input. Every kernel is a fixed
//! sequence of IEEE operations per element (no reductions in floating point, no threads, no
//! fused multiply-add), so results depend only on the input bits.

mod feedback;
mod kernels;
#[cfg(test)]
mod tests;

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::sync::SyncCodec;

pub use feedback::ErrorFeedback;

/// Magic number that starts every encoded tensor.
pub const BLOB_MAGIC: [u8; 4] = *b"FGQT";

/// Version of the blob layout described in the module documentation.
pub const BLOB_VERSION: u16 = 1;

/// Length of the fixed blob header.
pub const BLOB_HEADER_LEN: usize = 16;

/// Block size of int8 and int4 when a config does not name one.
pub const DEFAULT_BLOCK_SIZE: u32 = 256;

/// Smallest accepted block size: below it the 4-byte scale costs more than the values save.
pub const MIN_BLOCK_SIZE: u32 = 16;

/// Largest accepted block size: it bounds the scratch a kernel needs and, past it, one outlier
/// flattens too many values to zero.
pub const MAX_BLOCK_SIZE: u32 = 65_536;

const FLAG_ZSTD: u8 = 0b0000_0001;

/// How the values of an outer gradient are quantised before optional zstd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// The f32 values unchanged: lossless, 4 bytes per value.
    Fp32,
    /// bfloat16 (round to nearest-even): 2 bytes per value, 8 significant bits.
    Bf16,
    /// Symmetric int8 per block, scale `absmax / 127`: 1 byte per value plus 4 per block.
    Int8 { block_size: u32 },
    /// Symmetric absmax int4 per block, scale `absmax / 7`: half a byte per value plus 4 per
    /// block.
    ///
    /// Chosen over an E3M0-like 4-bit float (sign + 3-bit exponent, values `absmax * 2^-k`):
    /// on normal values with a few 10× outliers (what pseudo-gradients look like), block 256,
    /// absmax int4 has a relative L2 error of 0.13 against 0.19 for E3M0, because most of the
    /// energy sits within 3σ where uniform levels are finer than powers of two. E3M0 only wins
    /// when a block spans more than about 2^5 in magnitude, which the per-block scale already
    /// limits, and error feedback carries what either format loses into the next round.
    Int4 { block_size: u32 },
}

impl Codec {
    /// Checks the block size: a power of two in [`MIN_BLOCK_SIZE`]..=[`MAX_BLOCK_SIZE`].
    pub fn validate(&self) -> Result<()> {
        match *self {
            Codec::Fp32 | Codec::Bf16 => Ok(()),
            Codec::Int8 { block_size } | Codec::Int4 { block_size } => {
                if block_size.is_power_of_two()
                    && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
                {
                    Ok(())
                } else {
                    Err(Error::InvalidCompression {
                        reason: format!(
                            "block size {block_size} of {} is not a power of two between {MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE}; {DEFAULT_BLOCK_SIZE} is the usual choice",
                            self.name()
                        ),
                    })
                }
            }
        }
    }

    /// Whether decoding gives back exactly the encoded values (then error feedback is moot).
    pub fn is_lossless(&self) -> bool {
        matches!(self, Codec::Fp32)
    }

    /// Bytes of the body (before zstd) for `len` values.
    pub fn body_len(&self, len: usize) -> usize {
        match *self {
            Codec::Fp32 => len * 4,
            Codec::Bf16 => len * 2,
            Codec::Int8 { block_size } => len.div_ceil(block_size as usize) * 4 + len,
            Codec::Int4 { block_size } => {
                let block = block_size as usize;
                let full = len / block;
                let rest = len % block;
                full * (4 + block / 2) + if rest > 0 { 4 + rest.div_ceil(2) } else { 0 }
            }
        }
    }

    /// The codec as named in configs: `fp32`, `bf16`, `int8`, `int4`.
    pub fn name(&self) -> &'static str {
        match self {
            Codec::Fp32 => "fp32",
            Codec::Bf16 => "bf16",
            Codec::Int8 { .. } => "int8",
            Codec::Int4 { .. } => "int4",
        }
    }

    fn id(&self) -> u8 {
        match self {
            Codec::Fp32 => 0,
            Codec::Bf16 => 1,
            Codec::Int8 { .. } => 2,
            Codec::Int4 { .. } => 3,
        }
    }

    fn block_size(&self) -> u32 {
        match *self {
            Codec::Fp32 | Codec::Bf16 => 0,
            Codec::Int8 { block_size } | Codec::Int4 { block_size } => block_size,
        }
    }

    fn from_name(name: CodecName, block_size: Option<u32>) -> Result<Codec> {
        let codec = match (name, block_size) {
            (CodecName::Fp32, None) => Codec::Fp32,
            (CodecName::Bf16, None) => Codec::Bf16,
            (CodecName::Fp32 | CodecName::Bf16, Some(block_size)) => {
                return Err(Error::InvalidCompression {
                    reason: format!(
                        "block_size = {block_size} is set but codec {} has no blocks; remove block_size or use int8/int4",
                        if name == CodecName::Fp32 {
                            "fp32"
                        } else {
                            "bf16"
                        }
                    ),
                });
            }
            (CodecName::Int8, block_size) => Codec::Int8 {
                block_size: block_size.unwrap_or(DEFAULT_BLOCK_SIZE),
            },
            (CodecName::Int4, block_size) => Codec::Int4 {
                block_size: block_size.unwrap_or(DEFAULT_BLOCK_SIZE),
            },
        };
        codec.validate()?;
        Ok(codec)
    }

    fn to_name(self) -> (CodecName, Option<u32>) {
        match self {
            Codec::Fp32 => (CodecName::Fp32, None),
            Codec::Bf16 => (CodecName::Bf16, None),
            Codec::Int8 { block_size } => (CodecName::Int8, Some(block_size)),
            Codec::Int4 { block_size } => (CodecName::Int4, Some(block_size)),
        }
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Codec::Fp32 | Codec::Bf16 => f.write_str(self.name()),
            Codec::Int8 { block_size } | Codec::Int4 { block_size } => {
                write!(f, "{} (block {block_size})", self.name())
            }
        }
    }
}

/// A codec and an optional zstd level for the encoded bytes: what a `[diloco]` config names, as
/// `compression = { codec = "int8", block_size = 256, zstd = 3 }` (block_size defaults to 256,
/// no `zstd` key means no zstd).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "CompressionSpec", into = "CompressionSpec")]
pub struct Compression {
    pub codec: Codec,
    /// zstd level applied to the encoded body; `None` sends it as is.
    pub zstd: Option<i32>,
}

impl Compression {
    /// A validated codec and zstd level.
    pub fn new(codec: Codec, zstd: Option<i32>) -> Result<Compression> {
        let compression = Compression { codec, zstd };
        compression.validate()?;
        Ok(compression)
    }

    /// Checks the block size and that the zstd level is one zstd accepts.
    pub fn validate(&self) -> Result<()> {
        self.codec.validate()?;
        if let Some(level) = self.zstd {
            let range = zstd::compression_level_range();
            if !range.contains(&level) {
                return Err(Error::InvalidCompression {
                    reason: format!(
                        "zstd level {level} is outside {}..={}; 3 is a good speed/size balance",
                        range.start(),
                        range.end()
                    ),
                });
            }
        }
        Ok(())
    }

    /// The codec id a [`SyncChunkHeader`](crate::sync::SyncChunkHeader) carries, and whether
    /// the payload is zstd-compressed.
    pub fn sync_codec(&self) -> (SyncCodec, bool) {
        let codec = match self.codec {
            Codec::Fp32 => SyncCodec::F32,
            Codec::Bf16 => SyncCodec::Bf16,
            Codec::Int8 { block_size } => SyncCodec::Int8Blocks { block: block_size },
            Codec::Int4 { block_size } => SyncCodec::Int4Blocks { block: block_size },
        };
        (codec, self.zstd.is_some())
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.zstd {
            Some(level) => write!(f, "{} + zstd {level}", self.codec),
            None => write!(f, "{}", self.codec),
        }
    }
}

/// The flat shape configs use; converting from it validates.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CompressionSpec {
    codec: CodecName,
    #[serde(default)]
    block_size: Option<u32>,
    #[serde(default)]
    zstd: Option<i32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum CodecName {
    Fp32,
    Bf16,
    Int8,
    Int4,
}

impl TryFrom<CompressionSpec> for Compression {
    type Error = Error;

    fn try_from(spec: CompressionSpec) -> Result<Compression> {
        Compression::new(Codec::from_name(spec.codec, spec.block_size)?, spec.zstd)
    }
}

impl From<Compression> for CompressionSpec {
    fn from(compression: Compression) -> CompressionSpec {
        let (codec, block_size) = compression.codec.to_name();
        CompressionSpec {
            codec,
            block_size,
            zstd: compression.zstd,
        }
    }
}

/// Fails on the first NaN or infinity, naming its index: a node must not send a poisoned update.
pub fn check_finite(values: &[f32]) -> Result<()> {
    match kernels::first_non_finite(values) {
        Some(index) => Err(Error::NonFinite {
            index,
            value: values[index],
        }),
        None => Ok(()),
    }
}

/// Encodes `values` into a self-describing blob.
///
/// Fails if a value is NaN or infinite, if bf16 would round a value to infinity (|x| above about
/// 3.39e38), or if there are more than `u32::MAX` values.
pub fn encode(values: &[f32], compression: &Compression) -> Result<Vec<u8>> {
    let mut blob = Vec::new();
    encode_into(values, compression, &mut blob)?;
    Ok(blob)
}

/// [`encode`] into `blob`, replacing what it held: a buffer kept from one call to the next
/// spares the page faults of a fresh allocation of the blob's size. On error `blob` holds
/// nothing useful.
pub fn encode_into(values: &[f32], compression: &Compression, blob: &mut Vec<u8>) -> Result<()> {
    compression.validate()?;
    let count = u32::try_from(values.len()).map_err(|_| Error::TooManyValues {
        len: values.len(),
        max: u32::MAX as usize,
    })?;
    let codec = compression.codec;
    let body_len = codec.body_len(values.len());
    blob.clear();
    blob.resize(BLOB_HEADER_LEN + body_len, 0);
    blob[0..4].copy_from_slice(&BLOB_MAGIC);
    blob[4..6].copy_from_slice(&BLOB_VERSION.to_le_bytes());
    blob[6] = codec.id();
    blob[8..12].copy_from_slice(&count.to_le_bytes());
    blob[12..16].copy_from_slice(&codec.block_size().to_le_bytes());
    kernels::encode_body(codec, values, &mut blob[BLOB_HEADER_LEN..])?;
    if let Some(level) = compression.zstd {
        // Compressing an in-memory slice fails only when allocation does.
        let packed = zstd::bulk::compress(&blob[BLOB_HEADER_LEN..], level).map_err(Error::Zstd)?;
        blob.truncate(BLOB_HEADER_LEN);
        blob.extend_from_slice(&packed);
        blob[7] = FLAG_ZSTD;
    }
    Ok(())
}

/// Decodes a blob that must hold `expected_len` values encoded with `compression`.
pub fn decode(blob: &[u8], expected_len: usize, compression: &Compression) -> Result<Vec<f32>> {
    let body = checked_body(blob, expected_len, compression)?;
    let mut out = vec![0f32; expected_len];
    kernels::decode_body::<false>(compression.codec, &body, &mut out)?;
    Ok(out)
}

/// Decodes a blob into `out`, whose length is the expected element count.
///
/// Without zstd this allocates nothing; with zstd it inflates into one buffer of exactly the
/// body length the codec implies for `out.len()` values. On error `out` may be partly written.
pub fn decode_into(blob: &[u8], out: &mut [f32], compression: &Compression) -> Result<()> {
    let body = checked_body(blob, out.len(), compression)?;
    kernels::decode_body::<false>(compression.codec, &body, out)
}

/// Decodes a blob and adds it element-wise to `acc` (`acc[i] += decoded[i]`), the reduce step of
/// the all-reduce. Allocates as [`decode_into`] does.
///
/// The blob is validated whole before `acc` is touched, so a corrupt blob leaves `acc`
/// unchanged; the sum itself can still overflow if peers send huge values, which the caller's
/// norm check is for.
pub fn decode_add_into(blob: &[u8], acc: &mut [f32], compression: &Compression) -> Result<()> {
    let body = checked_body(blob, acc.len(), compression)?;
    kernels::validate_body(compression.codec, &body, acc.len())?;
    kernels::decode_body::<true>(compression.codec, &body, acc)
}

/// The body of a blob, inflated if needed, after checking the header against what the caller
/// expects; its length is exactly `codec.body_len(expected_len)`.
fn checked_body<'a>(
    blob: &'a [u8],
    expected_len: usize,
    compression: &Compression,
) -> Result<std::borrow::Cow<'a, [u8]>> {
    compression.validate()?;
    let Some(head) = blob.get(..BLOB_HEADER_LEN) else {
        return Err(Error::Truncated {
            needed: BLOB_HEADER_LEN,
            got: blob.len(),
        });
    };
    let u32_at =
        |at: usize| u32::from_le_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
    let magic = [head[0], head[1], head[2], head[3]];
    if magic != BLOB_MAGIC {
        return Err(Error::BadMagic {
            kind: "encoded tensor",
            expected: BLOB_MAGIC,
            found: magic,
        });
    }
    let version = u16::from_le_bytes([head[4], head[5]]);
    if version != BLOB_VERSION {
        return Err(Error::UnsupportedFormat {
            found: version,
            supported: BLOB_VERSION,
        });
    }
    let flags = head[7];
    if flags & !FLAG_ZSTD != 0 {
        return Err(Error::UnknownFlags { flags });
    }
    let (codec_id, block_size, zstd) = (head[6], u32_at(12), flags & FLAG_ZSTD != 0);
    let codec = compression.codec;
    if codec_id != codec.id()
        || block_size != codec.block_size()
        || zstd != compression.zstd.is_some()
    {
        return Err(Error::CodecMismatch {
            expected: format!(
                "{codec}{}",
                if compression.zstd.is_some() {
                    " + zstd"
                } else {
                    ""
                }
            ),
            found: format!(
                "{} (codec id {codec_id}), block size {block_size}{}",
                match codec_id {
                    0 => "fp32",
                    1 => "bf16",
                    2 => "int8",
                    3 => "int4",
                    _ => "an unknown codec",
                },
                if zstd { " + zstd" } else { "" }
            ),
        });
    }
    let count = u32_at(8);
    if u64::from(count) != expected_len as u64 {
        return Err(Error::ValueCountMismatch {
            expected: expected_len,
            found: count.into(),
        });
    }
    let body_len = codec.body_len(expected_len);
    let payload = &blob[BLOB_HEADER_LEN..];
    if !zstd {
        if payload.len() != body_len {
            return Err(Error::LengthMismatch {
                declared: body_len as u64,
                actual: payload.len() as u64,
            });
        }
        return Ok(std::borrow::Cow::Borrowed(payload));
    }
    // One extra byte of room tells "frame inflates to more than the body" apart from "exactly
    // the body"; the buffer never exceeds what the caller's expected length implies.
    let mut body = vec![0u8; body_len + 1];
    let inflated = zstd::bulk::decompress_to_buffer(payload, &mut body[..]).map_err(Error::Zstd)?;
    if inflated != body_len {
        return Err(Error::DecompressedSize {
            declared: body_len as u64,
            actual: inflated as u64,
        });
    }
    body.truncate(body_len);
    Ok(std::borrow::Cow::Owned(body))
}
