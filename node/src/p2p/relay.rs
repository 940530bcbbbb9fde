//! Relayed results, for sparse codecs: the owner of a range forwards every member's encoded
//! contribution to it instead of encoding their sum.
//!
//! Top-k of a sum of top-k contributions keeps `k` of up to `K·k` values per block: at four
//! members three quarters of every round's average would wait in the owner's error feedback,
//! and the model trained far worse than with int8 (docs/benchmarks/diloco-quality-wikipedia.md).
//! A relayed chunk is the members' bytes for that range in member order, each behind its length
//! (`u32` little-endian); every member decodes the parts, sums them in f64 in member order and
//! divides by the round's total weight, so all members, the owner included, get the same bits.
//! The all-gather then carries `K` times the contribution's bytes, still a small fraction of an
//! int8 all-reduce at the densities `topk` is used with.

use forge_protocol::sync::MAX_SYNC_CHUNK_BYTES;

use super::all_reduce::ChunkCodec;

/// Writes `parts` (the members' encoded contributions to one chunk, in member order) into
/// `out` as one relayed chunk, replacing what it held.
pub(crate) fn pack(parts: &[&[u8]], out: &mut Vec<u8>) -> Result<(), String> {
    out.clear();
    let total: usize = parts.iter().map(|p| 4 + p.len()).sum();
    if total > MAX_SYNC_CHUNK_BYTES as usize {
        return Err(format!(
            "a relayed chunk of {} members' contributions takes {total} bytes, more than the \
             {MAX_SYNC_CHUNK_BYTES} a sync chunk may carry; lower the all-reduce's chunk size \
             or use a dense codec for this many members",
            parts.len()
        ));
    }
    out.reserve(total);
    for part in parts {
        out.extend_from_slice(&(part.len() as u32).to_le_bytes());
        out.extend_from_slice(part);
    }
    Ok(())
}

/// The `members` parts of a relayed chunk, or what is wrong with it.
fn parts(bytes: &[u8], members: usize) -> Result<Vec<&[u8]>, String> {
    let mut rest = bytes;
    let mut parts = Vec::with_capacity(members);
    for m in 0..members {
        let Some((len, tail)) = rest.split_first_chunk::<4>() else {
            return Err(format!(
                "the relayed chunk ends before member {m}'s part ({} bytes in all, {members} \
                 parts expected)",
                bytes.len()
            ));
        };
        let len = u32::from_le_bytes(*len) as usize;
        if len > tail.len() {
            return Err(format!(
                "member {m}'s part claims {len} bytes, {} are left in the relayed chunk",
                tail.len()
            ));
        }
        let (part, tail) = tail.split_at(len);
        parts.push(part);
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(format!(
            "{} bytes follow the {members} parts of the relayed chunk",
            rest.len()
        ));
    }
    Ok(parts)
}

/// Decodes a relayed chunk into `out`: the sum of the parts (in member order, in f64) over
/// `total_weight`. `sum` and `part` are scratch of at least `out.len()` values. On error `out`
/// may be partly written.
pub(crate) fn decode(
    codec: &dyn ChunkCodec,
    bytes: &[u8],
    members: usize,
    total_weight: f64,
    out: &mut [f32],
    sum: &mut [f64],
    part: &mut [f32],
) -> Result<(), String> {
    let n = out.len();
    let (sum, part) = (&mut sum[..n], &mut part[..n]);
    sum.fill(0.0);
    for (m, bytes) in parts(bytes, members)?.into_iter().enumerate() {
        codec
            .decode_into(bytes, part)
            .map_err(|err| format!("member {m}'s part: {err}"))?;
        for (acc, &x) in sum.iter_mut().zip(part.iter()) {
            *acc += f64::from(x);
        }
    }
    for (v, &s) in out.iter_mut().zip(sum.iter()) {
        *v = (s / total_weight) as f32;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::p2p::bench::Fp32Codec;

    fn fp32(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn a_relayed_chunk_decodes_to_the_weighted_average_of_its_parts() {
        let (a, b) = (fp32(&[1.0, 2.0, 0.0]), fp32(&[3.0, -2.0, 0.5]));
        let mut bytes = Vec::new();
        pack(&[&a, &b], &mut bytes).unwrap();
        let mut out = [0.0f32; 3];
        let (mut sum, mut part) = ([0.0f64; 3], [0.0f32; 3]);
        decode(&Fp32Codec, &bytes, 2, 4.0, &mut out, &mut sum, &mut part).unwrap();
        assert_eq!(out, [1.0, 0.0, 0.125]);
    }

    #[test]
    fn malformed_relayed_chunks_are_refused_naming_the_problem() {
        let a = fp32(&[1.0, 2.0]);
        let mut bytes = Vec::new();
        pack(&[&a, &a], &mut bytes).unwrap();
        let (mut out, mut sum, mut part) = ([0.0f32; 2], [0.0f64; 2], [0.0f32; 2]);
        let mut try_decode = |bytes: &[u8], members| {
            decode(
                &Fp32Codec, bytes, members, 1.0, &mut out, &mut sum, &mut part,
            )
        };
        let err = try_decode(&bytes, 3).unwrap_err();
        assert!(err.contains("ends before member 2"), "{err}");
        let err = try_decode(&bytes, 1).unwrap_err();
        assert!(err.contains("12 bytes follow the 1 parts"), "{err}");
        let err = try_decode(&bytes[..bytes.len() - 1], 2).unwrap_err();
        assert!(
            err.contains("member 1's part claims 8 bytes, 7 are left"),
            "{err}"
        );
        let mut short = Vec::new();
        pack(&[&a, &a[..4]], &mut short).unwrap();
        let err = try_decode(&short, 2).unwrap_err();
        assert!(err.starts_with("member 1's part:"), "{err}");
        try_decode(&bytes, 2).unwrap();
    }
}
