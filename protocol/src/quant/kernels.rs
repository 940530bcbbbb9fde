//! The per-codec loops: finiteness checks, block scales, quantisation and packing, and their
//! inverses. Written as straight loops over one block at a time with integer tricks where floats
//! would need a libm call or a non-associative reduction, so they vectorise and stay bit-exact.

use super::Codec;
use crate::error::{Error, Result};

/// Bits of an f32 without its sign.
const ABS_MASK: u32 = 0x7FFF_FFFF;
/// Exponent field; all ones means infinity or NaN.
const EXP_MASK: u32 = 0x7F80_0000;
/// Adding 1.5 × 2^23 to a float in ±2^22 leaves its nearest-even integer in the low mantissa
/// bits (the default rounding mode, which Rust guarantees); `f32::round_ties_even` would be a
/// libm call on baseline x86-64 and stop vectorisation.
const ROUND_MAGIC: f32 = 12_582_912.0;
const INT8_MAX: f32 = 127.0;
const INT4_MAX: f32 = 7.0;

/// Index of the first NaN or infinity.
pub(super) fn first_non_finite(values: &[f32]) -> Option<usize> {
    // The integer max over whole blocks vectorises; only a poisoned block is searched.
    const SCAN: usize = 1024;
    values.chunks(SCAN).enumerate().find_map(|(chunk, block)| {
        if abs_max_bits(block) < EXP_MASK {
            return None;
        }
        block
            .iter()
            .position(|v| !v.is_finite())
            .map(|at| chunk * SCAN + at)
    })
}

/// Largest `|x|` as bits: for non-negative floats, integer order is float order, and infinity
/// and NaN compare above every finite value, so one integer max also detects them.
fn abs_max_bits(block: &[f32]) -> u32 {
    block
        .iter()
        .fold(0u32, |max, v| max.max(v.to_bits() & ABS_MASK))
}

fn non_finite(values: &[f32], offset: usize) -> Error {
    let at = values.iter().position(|v| !v.is_finite()).unwrap_or(0);
    Error::NonFinite {
        index: offset + at,
        value: values[at],
    }
}

fn nearest_int(v: f32) -> i32 {
    (v + ROUND_MAGIC).to_bits() as i32 - ROUND_MAGIC.to_bits() as i32
}

fn corrupt(reason: String) -> Error {
    Error::CorruptTensor { reason }
}

/// Writes the body of `values` into `body` (exactly `codec.body_len(values.len())` bytes).
pub(super) fn encode_body(codec: Codec, values: &[f32], body: &mut [u8]) -> Result<()> {
    match codec {
        Codec::Fp32 => {
            if let Some(index) = first_non_finite(values) {
                return Err(Error::NonFinite {
                    index,
                    value: values[index],
                });
            }
            for (out, v) in body.chunks_exact_mut(4).zip(values) {
                out.copy_from_slice(&v.to_le_bytes());
            }
            Ok(())
        }
        Codec::Bf16 => encode_bf16(values, body),
        Codec::Int8 { block_size } => encode_blocks(values, body, block_size as usize, INT8_MAX),
        Codec::Int4 { block_size } => encode_blocks(values, body, block_size as usize, INT4_MAX),
        Codec::TopK {
            block_size,
            k,
            bits,
        } => encode_topk(values, body, block_size, k, bits),
    }
}

fn encode_bf16(values: &[f32], body: &mut [u8]) -> Result<()> {
    // Per slice of 1024 values: convert, then check once that nothing was or became non-finite.
    const SCAN: usize = 1024;
    for (chunk, (vals, out)) in values
        .chunks(SCAN)
        .zip(body.chunks_mut(SCAN * 2))
        .enumerate()
    {
        let mut exp_all_ones = false;
        for (o, v) in out.chunks_exact_mut(2).zip(vals) {
            let bits = v.to_bits();
            // Round to nearest-even on the 16 dropped bits.
            let rounded = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16;
            exp_all_ones |= (rounded as u16 & 0x7F80) == 0x7F80;
            o.copy_from_slice(&(rounded as u16).to_le_bytes());
        }
        if exp_all_ones {
            let offset = chunk * SCAN;
            if first_non_finite(vals).is_some() {
                return Err(non_finite(vals, offset));
            }
            let at = vals
                .iter()
                .position(|v| v.abs() > f32::from_bits(0x7F7F_7FFF))
                .unwrap_or(0);
            return Err(Error::OutOfRange {
                index: offset + at,
                value: vals[at],
                codec: "bf16",
            });
        }
    }
    Ok(())
}

/// int8 and int4: per block an f32 scale `absmax / qmax`, then the values divided by it and
/// rounded to the nearest integer (ties to even), packed one (int8) or two (int4) per byte.
fn encode_blocks(values: &[f32], body: &mut [u8], block: usize, qmax: f32) -> Result<()> {
    let int4 = qmax == INT4_MAX;
    let mut codes = body;
    for (index, vals) in values.chunks(block).enumerate() {
        let absmax_bits = abs_max_bits(vals);
        if absmax_bits >= EXP_MASK {
            return Err(non_finite(vals, index * block));
        }
        let mut scale = f32::from_bits(absmax_bits) / qmax;
        if !(scale * qmax).is_finite() {
            // Only for |x| within an ulp or so of f32::MAX: one ulp less keeps every decoded
            // value finite, and the clamp below absorbs the slightly larger quotient.
            scale = f32::from_bits(scale.to_bits() - 1);
        }
        // A block whose scale is subnormal (absmax below ~1e-36) encodes as zeros: 1/scale would
        // overflow, and such values are far below anything a pseudo_grad carries.
        let inv = if scale >= f32::MIN_POSITIVE {
            1.0 / scale
        } else {
            0.0
        };
        let packed_len = if int4 {
            vals.len().div_ceil(2)
        } else {
            vals.len()
        };
        let (head, rest) = std::mem::take(&mut codes).split_at_mut(4 + packed_len);
        codes = rest;
        head[..4].copy_from_slice(&scale.to_le_bytes());
        let out = &mut head[4..];
        let quantise = |v: f32| nearest_int((v * inv).clamp(-qmax, qmax));
        if int4 {
            let mut pairs = vals.chunks_exact(2);
            for (o, pair) in out.iter_mut().zip(&mut pairs) {
                let lo = quantise(pair[0]) as u8 & 0x0F;
                let hi = quantise(pair[1]) as u8 & 0x0F;
                *o = lo | (hi << 4);
            }
            if let [last] = pairs.remainder() {
                out[packed_len - 1] = quantise(*last) as u8 & 0x0F;
            }
        } else {
            for (o, &v) in out.iter_mut().zip(vals) {
                *o = quantise(v) as i8 as u8;
            }
        }
    }
    Ok(())
}

/// Where a topk block of `n` values keeps its parts: after the 4-byte scale, `kept` indices of
/// `index_width` bits in `index_bytes`, then `kept` codes of `code_width` bits in `code_bytes`.
pub(super) struct TopKLayout {
    kept: usize,
    index_width: u32,
    code_width: u32,
    index_bytes: usize,
    code_bytes: usize,
}

impl TopKLayout {
    /// For a valid topk codec and `n` in `1..=block_size`.
    pub(super) fn new(block_size: u32, k: u32, bits: u8, n: usize) -> TopKLayout {
        let kept = (k as usize).min(n);
        let index_width = block_size.trailing_zeros();
        let code_width = u32::from(bits);
        TopKLayout {
            kept,
            index_width,
            code_width,
            index_bytes: (kept * index_width as usize).div_ceil(8),
            code_bytes: (kept * code_width as usize).div_ceil(8),
        }
    }

    /// Bytes of the block in the body.
    pub(super) fn len(&self) -> usize {
        4 + self.index_bytes + self.code_bytes
    }

    /// The largest level in steps: 3 at 2 bits, 15 at 4.
    fn qmax(&self) -> f32 {
        ((1u32 << self.code_width) - 1) as f32
    }

    /// The block's step `scale / qmax` (its levels are the odd multiples of it), refused unless
    /// every level stays finite; also refuses indices that do not ascend strictly or run past
    /// the block's `n` values, and non-zero padding bits.
    fn check(&self, head: &[u8], n: usize, block_index: usize) -> Result<f32> {
        let scale = f32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let step = scale / self.qmax();
        if !(scale.is_sign_positive() && (step * self.qmax()).is_finite()) {
            return Err(corrupt(format!(
                "topk block {block_index} has scale {scale}, which is negative, not finite or overflows"
            )));
        }
        let (indices, codes) = head[4..].split_at(self.index_bytes);
        // The smallest index the next one may be.
        let mut next = 0;
        for index in unpack_bits(indices, self.index_width, self.kept) {
            if index < next {
                return Err(corrupt(format!(
                    "topk block {block_index} keeps index {index} after index {}: kept indices must ascend strictly",
                    next - 1
                )));
            }
            if index as usize >= n {
                return Err(corrupt(format!(
                    "topk block {block_index} keeps index {index}, past its {n} values"
                )));
            }
            next = index + 1;
        }
        if !(padding_is_zero(indices, self.index_width, self.kept)
            && padding_is_zero(codes, self.code_width, self.kept))
        {
            return Err(corrupt(format!(
                "topk block {block_index} has non-zero padding bits after its indices or codes"
            )));
        }
        Ok(step)
    }
}

/// topk: per block, the `k` values of largest `|x|` (ties to the lower index), then their
/// indices ascending and their codes, as the module documentation lays out.
fn encode_topk(values: &[f32], body: &mut [u8], block_size: u32, k: u32, bits: u8) -> Result<()> {
    let block = block_size as usize;
    // One key per value orders by |x| descending, then index ascending: the complement of the
    // sign-masked bits above the index. The keys are distinct, so the kept set is the same
    // whatever the selection algorithm does with equal |x|.
    let mut keys = Vec::with_capacity(block.min(values.len()));
    let mut rest = body;
    for (index, vals) in values.chunks(block).enumerate() {
        let absmax_bits = abs_max_bits(vals);
        if absmax_bits >= EXP_MASK {
            return Err(non_finite(vals, index * block));
        }
        let layout = TopKLayout::new(block_size, k, bits, vals.len());
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(layout.len());
        rest = tail;
        keys.clear();
        keys.extend(
            vals.iter()
                .enumerate()
                .map(|(i, v)| u64::from(!(v.to_bits() & ABS_MASK)) << 32 | i as u64),
        );
        keys.select_nth_unstable(layout.kept - 1);
        let kept = &mut keys[..layout.kept];
        kept.sort_unstable_by_key(|&key| key as u32);
        let qmax = layout.qmax();
        let mut scale = f32::from_bits(absmax_bits);
        if !(scale / qmax * qmax).is_finite() {
            // Only within an ulp or so of f32::MAX, as for the block codecs.
            scale = f32::from_bits(absmax_bits - 1);
        }
        let step = scale / qmax;
        head[..4].copy_from_slice(&scale.to_le_bytes());
        let (indices, codes) = head[4..].split_at_mut(layout.index_bytes);
        pack_bits(
            kept.iter().map(|&key| key as u32),
            layout.index_width,
            indices,
        );
        let sign_bit = layout.code_width - 1;
        let max_j = (1 << sign_bit) - 1;
        pack_bits(
            kept.iter().map(|&key| {
                let v = vals[key as u32 as usize];
                // The nearest odd level 2j + 1 to |v| / step is at j = floor(|v| / step / 2).
                // A zero step (absmax 0 or below ~1e-44) gives j = 0 or saturates it; either
                // decodes to zero.
                let j = ((v.abs() / step * 0.5) as u32).min(max_j);
                (v.to_bits() >> 31) << sign_bit | j
            }),
            layout.code_width,
            codes,
        );
    }
    Ok(())
}

/// Packs `width`-bit values into `out` little-endian: value `i` at stream bits `i·width..`,
/// stream bit 0 the least significant bit of `out[0]`; the last byte's unused bits are zero.
fn pack_bits(values: impl Iterator<Item = u32>, width: u32, out: &mut [u8]) {
    let (mut acc, mut filled, mut at) = (0u32, 0, 0);
    for v in values {
        acc |= v << filled;
        filled += width;
        while filled >= 8 {
            out[at] = acc as u8;
            (acc, filled, at) = (acc >> 8, filled - 8, at + 1);
        }
    }
    if filled > 0 {
        out[at] = acc as u8;
    }
}

/// The `count` values of `width` bits (at most 16) that [`pack_bits`] wrote into `bytes`.
fn unpack_bits(bytes: &[u8], width: u32, count: usize) -> impl Iterator<Item = u32> + '_ {
    let mask = (1u32 << width) - 1;
    (0..count).map(move |i| {
        let bit = i * width as usize;
        // Up to 16 bits starting anywhere in a byte lie within 3 bytes.
        let word = bytes[bit / 8..]
            .iter()
            .take(3)
            .rev()
            .fold(0u32, |word, &b| word << 8 | u32::from(b));
        (word >> (bit % 8)) & mask
    })
}

/// Whether the bits of `bytes` after `count` values of `width` bits are all zero.
fn padding_is_zero(bytes: &[u8], width: u32, count: usize) -> bool {
    let used = count * width as usize;
    used.is_multiple_of(8) || bytes[used / 8] >> (used % 8) == 0
}

/// Checks a whole body without writing anything, so [`decode_body`] with `ADD` cannot leave a
/// half-applied sum behind.
pub(super) fn validate_body(codec: Codec, body: &[u8], len: usize) -> Result<()> {
    match codec {
        Codec::Fp32 => {
            for (index, bytes) in body.chunks_exact(4).enumerate() {
                let v = f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                if !v.is_finite() {
                    return Err(corrupt(format!("value {index} is {v}")));
                }
            }
            Ok(())
        }
        Codec::Bf16 => {
            for (index, bytes) in body.chunks_exact(2).enumerate() {
                let bits = u16::from_le_bytes([bytes[0], bytes[1]]);
                if bits & 0x7F80 == 0x7F80 {
                    return Err(corrupt(format!(
                        "bf16 value {index} is not finite ({bits:#06x})"
                    )));
                }
            }
            Ok(())
        }
        Codec::Int8 { block_size } | Codec::Int4 { block_size } => {
            let int4 = matches!(codec, Codec::Int4 { .. });
            let block = block_size as usize;
            let mut rest = body;
            let mut start = 0;
            while start < len {
                let n = block.min(len - start);
                let packed_len = if int4 { n.div_ceil(2) } else { n };
                let (head, tail) = rest.split_at(4 + packed_len);
                rest = tail;
                let qmax = if int4 { INT4_MAX } else { INT8_MAX };
                block_scale(head, qmax, start / block)?;
                check_codes(&head[4..], int4, n, start / block)?;
                start += n;
            }
            Ok(())
        }
        Codec::TopK {
            block_size,
            k,
            bits,
        } => {
            let block = block_size as usize;
            let mut rest = body;
            for start in (0..len).step_by(block) {
                let n = block.min(len - start);
                let layout = TopKLayout::new(block_size, k, bits, n);
                let (head, tail) = rest.split_at(layout.len());
                rest = tail;
                layout.check(head, n, start / block)?;
            }
            Ok(())
        }
    }
}

/// The scale at the start of a block, refused unless every code times it stays finite.
fn block_scale(head: &[u8], qmax: f32, block_index: usize) -> Result<f32> {
    let scale = f32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    if !(scale.is_sign_positive() && (scale * qmax).is_finite()) {
        return Err(corrupt(format!(
            "block {block_index} has scale {scale}, which is negative or overflows"
        )));
    }
    Ok(scale)
}

/// Refuses codes the encoder never writes: -128 for int8, -8 or a non-zero padding nibble for
/// int4. They would decode to finite values, but they mean the bytes are not what was sent.
fn check_codes(codes: &[u8], int4: bool, n: usize, block_index: usize) -> Result<()> {
    let bad = if int4 {
        let minus_eight = codes.iter().fold(false, |bad, &b| {
            bad | (b & 0x0F == 0x08) | (b & 0xF0 == 0x80)
        });
        let padding = n % 2 == 1 && codes[codes.len() - 1] & 0xF0 != 0;
        minus_eight || padding
    } else {
        codes.iter().fold(false, |bad, &b| bad | (b == 0x80))
    };
    if bad {
        return Err(corrupt(format!(
            "block {block_index} holds a code outside the symmetric range (or non-zero padding)"
        )));
    }
    Ok(())
}

/// Decodes `body` into `out` (or adds to it when `ADD`); `body` is exactly
/// `codec.body_len(out.len())` bytes. Each block is validated before it is written.
pub(super) fn decode_body<const ADD: bool>(
    codec: Codec,
    body: &[u8],
    out: &mut [f32],
) -> Result<()> {
    match codec {
        // A flag instead of an early return keeps these loops vectorised; the slow path
        // names the offending value.
        Codec::Fp32 => {
            let mut bad = false;
            for (o, bytes) in out.iter_mut().zip(body.chunks_exact(4)) {
                let bits = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                bad |= bits & EXP_MASK == EXP_MASK;
                store::<ADD>(o, f32::from_bits(bits));
            }
            if bad {
                return validate_body(codec, body, out.len());
            }
            Ok(())
        }
        Codec::Bf16 => {
            let mut bad = false;
            for (o, bytes) in out.iter_mut().zip(body.chunks_exact(2)) {
                let bits = u16::from_le_bytes([bytes[0], bytes[1]]);
                bad |= bits & 0x7F80 == 0x7F80;
                store::<ADD>(o, f32::from_bits(u32::from(bits) << 16));
            }
            if bad {
                return validate_body(codec, body, out.len());
            }
            Ok(())
        }
        Codec::Int8 { block_size } => {
            let block = block_size as usize;
            let mut rest = body;
            for (index, outs) in out.chunks_mut(block).enumerate() {
                let (head, tail) = rest.split_at(4 + outs.len());
                rest = tail;
                let scale = block_scale(head, INT8_MAX, index)?;
                let codes = &head[4..];
                check_codes(codes, false, outs.len(), index)?;
                for (o, &c) in outs.iter_mut().zip(codes) {
                    store::<ADD>(o, f32::from(c as i8) * scale);
                }
            }
            Ok(())
        }
        Codec::Int4 { block_size } => {
            let block = block_size as usize;
            let mut rest = body;
            for (index, outs) in out.chunks_mut(block).enumerate() {
                let packed_len = outs.len().div_ceil(2);
                let (head, tail) = rest.split_at(4 + packed_len);
                rest = tail;
                let scale = block_scale(head, INT4_MAX, index)?;
                let codes = &head[4..];
                check_codes(codes, true, outs.len(), index)?;
                let mut pairs = outs.chunks_exact_mut(2);
                for (pair, &b) in (&mut pairs).zip(codes) {
                    // Arithmetic shifts sign-extend each nibble.
                    store::<ADD>(&mut pair[0], f32::from(((b << 4) as i8) >> 4) * scale);
                    store::<ADD>(&mut pair[1], f32::from((b as i8) >> 4) * scale);
                }
                if let [last] = pairs.into_remainder() {
                    let b = codes[packed_len - 1];
                    store::<ADD>(last, f32::from(((b << 4) as i8) >> 4) * scale);
                }
            }
            Ok(())
        }
        Codec::TopK {
            block_size,
            k,
            bits,
        } => {
            let mut rest = body;
            for (index, outs) in out.chunks_mut(block_size as usize).enumerate() {
                let layout = TopKLayout::new(block_size, k, bits, outs.len());
                let (head, tail) = rest.split_at(layout.len());
                rest = tail;
                let step = layout.check(head, outs.len(), index)?;
                if !ADD {
                    outs.fill(0.0);
                }
                let (indices, codes) = head[4..].split_at(layout.index_bytes);
                let sign_bit = layout.code_width - 1;
                let kept = unpack_bits(indices, layout.index_width, layout.kept).zip(unpack_bits(
                    codes,
                    layout.code_width,
                    layout.kept,
                ));
                for (i, code) in kept {
                    let level = ((code & ((1 << sign_bit) - 1)) * 2 + 1) as f32 * step;
                    let v = if code >> sign_bit == 1 { -level } else { level };
                    store::<ADD>(&mut outs[i as usize], v);
                }
            }
            Ok(())
        }
    }
}

fn store<const ADD: bool>(out: &mut f32, v: f32) {
    if ADD {
        *out += v;
    } else {
        *out = v;
    }
}
