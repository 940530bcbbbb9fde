//! Compression codecs for outer gradients (pseudo_grad): fp32, bf16, block int8, block int4 and
//! top-k sparsification, each optionally followed by zstd, plus error feedback for the lossy ones.
//!
//! Every encoded tensor is a self-describing blob, so a receiver that expects another codec or
//! another length refuses it with a clear error instead of decoding garbage:
//!
//! | bytes  | field                                                                  |
//! |--------|------------------------------------------------------------------------|
//! | 0..4   | magic `FGQT`                                                           |
//! | 4..6   | blob format version, u16 little-endian ([`BLOB_VERSION`])              |
//! | 6      | codec id: 0 fp32, 1 bf16, 2 int8, 3 int4, 4 topk                       |
//! | 7      | flags: bit 0 = body is one zstd frame; other bits zero                 |
//! | 8..12  | element count, u32 little-endian                                       |
//! | 12..16 | block size, u32 little-endian (0 for fp32 and bf16; topk packs more)   |
//! | 16..   | body, possibly zstd-compressed                                         |
//!
//! topk's u32 at 12..16 holds all its parameters: bits 0..5 `log2(block_size)`, bits 5..22 `k`,
//! bits 22..26 the bits per kept value, the rest zero.
//!
//! Body layouts (all little-endian):
//! - fp32: the values' IEEE bits.
//! - bf16: the upper 16 bits of each value, rounded to nearest-even.
//! - int8: per block, an f32 scale (`absmax / 127`) then one i8 per value in -127..=127.
//! - int4: per block, an f32 scale (`absmax / 7`) then two values per byte in -7..=7, element
//!   `2i` in the low nibble; an odd final element leaves the high nibble zero.
//! - topk: per block, keeping `m = min(k, block length)` values: an f32 scale (the block's
//!   absmax), then the `m` kept indices within the block, strictly ascending, at
//!   `log2(block_size)` bits each, then their `m` codes at `bits` bits each. A code's top bit is
//!   the sign and the others a `j` for the magnitude `(2j + 1) · scale / (2^bits - 1)`. Indices
//!   and codes are each packed little-endian (value `i` at stream bits `i·w..`, stream bit 0 the
//!   least significant bit of the first byte), the last byte padded with zero bits. Values not
//!   kept decode to zero.
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

pub use feedback::{ErrorFeedback, squares};

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

/// Block size of topk when a config does not name one.
pub const TOPK_DEFAULT_BLOCK_SIZE: u32 = 4096;

/// Smallest accepted topk block size: below it a block keeps too few values to spread its
/// 4-byte scale over.
pub const TOPK_MIN_BLOCK_SIZE: u32 = 64;

/// Fraction of each block topk keeps when a config does not say: 64 of 4096 values.
pub const TOPK_DEFAULT_DENSITY: f64 = 1.0 / 64.0;

/// Bits per kept topk value when a config does not say.
pub const TOPK_DEFAULT_BITS: u8 = 2;

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
    /// Per block, the `k` values of largest magnitude (ties to the lower index) with their
    /// indices, each quantised to `bits` (2 or 4) against one f32 scale, the block's absmax;
    /// the others decode to zero. Blocks of 4096 keeping 64 at 2 bits take 116 bytes, 0.71% of
    /// fp32 (zstd finds nothing more to take out), and error feedback sends what a round leaves
    /// out in later rounds.
    ///
    /// The levels are the odd multiples of `scale / (2^bits - 1)`: ±1 and ±3 at 2 bits, ±1..±15
    /// at 4. A kept value is among the largest of its block, so a zero level would waste a code.
    /// Measured on the kept values of 2^20 normal values with a few 10× outliers (as above),
    /// block 4096, k 64, relative L2 error: 4-bit odd levels 0.086 against 0.088 for absmax int4
    /// (-7..=7, a code spent on zero) and 0.23 for E3M0 (±scale·2^-j); over six seeds odd and
    /// int4 levels are a wash (0.086–0.114 against 0.087–0.100), and without outliers, where a
    /// block's kept values lie between about 0.6 and 1 times its absmax, the finer spacing of
    /// the odd levels wins (0.053 against 0.057). At 2 bits the odd levels give 0.43 (0.36
    /// without outliers); ±scale/2 and ±scale would give 0.61, since a block with an outlier
    /// keeps values far below its scale.
    TopK { block_size: u32, k: u32, bits: u8 },
}

impl Codec {
    /// Checks the block size: a power of two in [`MIN_BLOCK_SIZE`]..=[`MAX_BLOCK_SIZE`]
    /// ([`TOPK_MIN_BLOCK_SIZE`] for topk); and for topk that `k` is between 1 and the block
    /// size and `bits` is 2 or 4.
    pub fn validate(&self) -> Result<()> {
        let (block_size, min, usual) = match *self {
            Codec::Fp32 | Codec::Bf16 => return Ok(()),
            Codec::Int8 { block_size } | Codec::Int4 { block_size } => {
                (block_size, MIN_BLOCK_SIZE, DEFAULT_BLOCK_SIZE)
            }
            Codec::TopK { block_size, .. } => {
                (block_size, TOPK_MIN_BLOCK_SIZE, TOPK_DEFAULT_BLOCK_SIZE)
            }
        };
        let invalid = |reason: String| Err(Error::InvalidCompression { reason });
        if !(block_size.is_power_of_two() && (min..=MAX_BLOCK_SIZE).contains(&block_size)) {
            return invalid(format!(
                "block size {block_size} of {} is not a power of two between {min} and {MAX_BLOCK_SIZE}; {usual} is the usual choice",
                self.name()
            ));
        }
        if let Codec::TopK { k, bits, .. } = *self {
            if !(1..=block_size).contains(&k) {
                return invalid(format!(
                    "topk k = {k} (values kept per block) is not between 1 and the block size {block_size}; a config sets k through density, in (0, 1]"
                ));
            }
            if !matches!(bits, 2 | 4) {
                return invalid(format!(
                    "topk with bits = {bits} per kept value: bits must be 2 or 4; {TOPK_DEFAULT_BITS} is the usual choice"
                ));
            }
        }
        Ok(())
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
            Codec::TopK {
                block_size,
                k,
                bits,
            } => {
                let chunk = |n: usize| {
                    if n == 0 {
                        0
                    } else {
                        kernels::TopKLayout::new(block_size, k, bits, n).len()
                    }
                };
                let block = block_size as usize;
                len / block * chunk(block) + chunk(len % block)
            }
        }
    }

    /// The codec as named in configs: `fp32`, `bf16`, `int8`, `int4`, `topk`.
    pub fn name(&self) -> &'static str {
        self.to_spec().0.name()
    }

    fn id(&self) -> u8 {
        match self {
            Codec::Fp32 => 0,
            Codec::Bf16 => 1,
            Codec::Int8 { .. } => 2,
            Codec::Int4 { .. } => 3,
            Codec::TopK { .. } => 4,
        }
    }

    /// The header's u32 at 12..16 (see the module documentation); `self` must be valid.
    fn block_field(&self) -> u32 {
        match *self {
            Codec::Fp32 | Codec::Bf16 => 0,
            Codec::Int8 { block_size } | Codec::Int4 { block_size } => block_size,
            Codec::TopK {
                block_size,
                k,
                bits,
            } => block_size.trailing_zeros() | k << 5 | u32::from(bits) << 22,
        }
    }

    fn from_spec(spec: &CompressionSpec) -> Result<Codec> {
        let name = spec.codec;
        let invalid = |reason: String| Err(Error::InvalidCompression { reason });
        if name != CodecName::TopK {
            if let Some(density) = spec.density {
                return invalid(format!(
                    "density = {density} is set but codec {} keeps every value; remove density or use codec = \"topk\"",
                    name.name()
                ));
            }
            if let Some(bits) = spec.bits {
                return invalid(format!(
                    "bits = {bits} is set but codec {} has a fixed width; remove bits or use codec = \"topk\"",
                    name.name()
                ));
            }
        }
        let codec = match (name, spec.block_size) {
            (CodecName::Fp32, None) => Codec::Fp32,
            (CodecName::Bf16, None) => Codec::Bf16,
            (CodecName::Fp32 | CodecName::Bf16, Some(block_size)) => {
                return invalid(format!(
                    "block_size = {block_size} is set but codec {} has no blocks; remove block_size or use int8/int4/topk",
                    name.name()
                ));
            }
            (CodecName::Int8, block_size) => Codec::Int8 {
                block_size: block_size.unwrap_or(DEFAULT_BLOCK_SIZE),
            },
            (CodecName::Int4, block_size) => Codec::Int4 {
                block_size: block_size.unwrap_or(DEFAULT_BLOCK_SIZE),
            },
            (CodecName::TopK, block_size) => {
                let block_size = block_size.unwrap_or(TOPK_DEFAULT_BLOCK_SIZE);
                let density = spec.density.unwrap_or(TOPK_DEFAULT_DENSITY);
                if !(density > 0.0 && density <= 1.0) {
                    return invalid(format!(
                        "density = {density} of topk is not in (0, 1]: it is the fraction of each block kept; {TOPK_DEFAULT_DENSITY} (1/64) is the usual choice"
                    ));
                }
                let block = f64::from(block_size);
                Codec::TopK {
                    block_size,
                    // A whole number in 1..=block_size: the cast is exact.
                    k: (block * density).ceil().clamp(1.0, block.max(1.0)) as u32,
                    bits: spec.bits.unwrap_or(TOPK_DEFAULT_BITS),
                }
            }
        };
        codec.validate()?;
        Ok(codec)
    }

    /// The config's name, block size, density and bits; `k / block_size` is exact in f64 and
    /// gives back the same `k`.
    fn to_spec(self) -> (CodecName, Option<u32>, Option<f64>, Option<u8>) {
        match self {
            Codec::Fp32 => (CodecName::Fp32, None, None, None),
            Codec::Bf16 => (CodecName::Bf16, None, None, None),
            Codec::Int8 { block_size } => (CodecName::Int8, Some(block_size), None, None),
            Codec::Int4 { block_size } => (CodecName::Int4, Some(block_size), None, None),
            Codec::TopK {
                block_size,
                k,
                bits,
            } => (
                CodecName::TopK,
                Some(block_size),
                Some(f64::from(k) / f64::from(block_size)),
                Some(bits),
            ),
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
            Codec::TopK {
                block_size,
                k,
                bits,
            } => {
                write!(f, "topk (block {block_size}, k {k}, {bits}-bit)")
            }
        }
    }
}

/// A codec and an optional zstd level for the encoded bytes: what a `[diloco]` config names, as
/// `compression = { codec = "int8", block_size = 256, zstd = 3 }` (block_size defaults to 256,
/// no `zstd` key means no zstd) or `compression = { codec = "topk", block_size = 4096,
/// density = 0.015625, bits = 2, zstd = 3 }` (those are topk's defaults; it keeps
/// `k = max(1, ceil(block_size · density))` values of each block).
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
            Codec::TopK {
                block_size,
                k,
                bits,
            } => SyncCodec::TopK {
                block: block_size,
                k,
                bits,
            },
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
    /// topk only: the fraction of each block kept.
    #[serde(default)]
    density: Option<f64>,
    /// topk only: bits per kept value.
    #[serde(default)]
    bits: Option<u8>,
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
    TopK,
}

impl CodecName {
    fn name(self) -> &'static str {
        match self {
            CodecName::Fp32 => "fp32",
            CodecName::Bf16 => "bf16",
            CodecName::Int8 => "int8",
            CodecName::Int4 => "int4",
            CodecName::TopK => "topk",
        }
    }
}

impl TryFrom<CompressionSpec> for Compression {
    type Error = Error;

    fn try_from(spec: CompressionSpec) -> Result<Compression> {
        Compression::new(Codec::from_spec(&spec)?, spec.zstd)
    }
}

impl From<Compression> for CompressionSpec {
    fn from(compression: Compression) -> CompressionSpec {
        let (codec, block_size, density, bits) = compression.codec.to_spec();
        CompressionSpec {
            codec,
            block_size,
            density,
            bits,
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
    blob[12..16].copy_from_slice(&codec.block_field().to_le_bytes());
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
    let (codec_id, block_field, zstd) = (head[6], u32_at(12), flags & FLAG_ZSTD != 0);
    let codec = compression.codec;
    if codec_id != codec.id()
        || block_field != codec.block_field()
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
                "{} (codec id {codec_id}), {}{}",
                match codec_id {
                    0 => "fp32",
                    1 => "bf16",
                    2 => "int8",
                    3 => "int4",
                    4 => "topk",
                    _ => "an unknown codec",
                },
                if codec_id == 4 {
                    format!(
                        "block {}, k {}, {}-bit",
                        1u64 << (block_field & 0x1F),
                        (block_field >> 5) & 0x1_FFFF,
                        block_field >> 22
                    )
                } else {
                    format!("block size {block_field}")
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
