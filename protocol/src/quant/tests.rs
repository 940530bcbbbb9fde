//! Tests of the codecs, their blob format, error feedback, and a printed size/error/speed table.

use std::time::Instant;

use proptest::prelude::*;

use super::*;
use crate::rng::SplitMix64;

const INT8: Codec = Codec::Int8 { block_size: 256 };
const INT4: Codec = Codec::Int4 { block_size: 256 };

fn plain(codec: Codec) -> Compression {
    Compression::new(codec, None).unwrap()
}

fn zstd3(codec: Codec) -> Compression {
    Compression::new(codec, Some(3)).unwrap()
}

/// Every codec, block sizes at both ends of the range, with and without zstd.
fn all_compressions() -> Vec<Compression> {
    let codecs = [
        Codec::Fp32,
        Codec::Bf16,
        Codec::Int8 { block_size: 16 },
        INT8,
        Codec::Int4 { block_size: 16 },
        INT4,
    ];
    codecs
        .iter()
        .flat_map(|&codec| [plain(codec), zstd3(codec)])
        .collect()
}

/// Normal samples by Box–Muller on SplitMix64, so the tests need no RNG crate and every run sees
/// the same numbers.
fn normal(rng: &mut SplitMix64, std: f64) -> f32 {
    let u1 = rng.next_f64().max(f64::MIN_POSITIVE);
    let u2 = rng.next_f64();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * std) as f32
}

/// What a pseudo_grad looks like: normal with std 1e-3, one value in ~10,000 ten times larger.
fn pseudo_grad(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..len)
        .map(|_| {
            let v = normal(&mut rng, 1e-3);
            if rng.next_u64().is_multiple_of(10_000) {
                v * 10.0
            } else {
                v
            }
        })
        .collect()
}

fn rel_l2(reference: &[f32], approx: &[f32]) -> f64 {
    let (mut err, mut norm) = (0f64, 0f64);
    for (&r, &a) in reference.iter().zip(approx) {
        err += (f64::from(r) - f64::from(a)).powi(2);
        norm += f64::from(r).powi(2);
    }
    (err / norm).sqrt()
}

/// The largest error a codec may make on `v` inside `block`: half a quantisation step for the
/// block codecs, half a bf16 ulp, nothing for fp32.
fn max_error(codec: Codec, block: &[f32], v: f32) -> f32 {
    let absmax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
    match codec {
        Codec::Fp32 => 0.0,
        Codec::Bf16 => v.abs() * 2f32.powi(-8),
        Codec::Int8 { .. } => absmax / 127.0 * 0.5001,
        Codec::Int4 { .. } => absmax / 7.0 * 0.5001,
    }
}

fn block_len(codec: Codec) -> usize {
    match codec {
        Codec::Fp32 | Codec::Bf16 => 1,
        Codec::Int8 { block_size } | Codec::Int4 { block_size } => block_size as usize,
    }
}

#[test]
fn round_trip_error_is_within_half_a_step_for_every_codec() {
    // 1000 is neither a multiple of 16 nor even after the last full block of 256, so partial
    // blocks and an odd final int4 nibble are covered.
    for len in [0, 1, 999, 1000] {
        let values = pseudo_grad(len, 7);
        for compression in all_compressions() {
            let blob = encode(&values, &compression).unwrap();
            let decoded = decode(&blob, len, &compression).unwrap();
            let block = block_len(compression.codec);
            for (i, (&v, &d)) in values.iter().zip(&decoded).enumerate() {
                let chunk = &values[i / block * block..((i / block + 1) * block).min(len)];
                let bound = max_error(compression.codec, chunk, v);
                assert!(
                    (v - d).abs() <= bound,
                    "{compression}: value {i} = {v} decoded as {d}, bound {bound}"
                );
            }
        }
    }
}

#[test]
fn uncompressed_blob_has_the_documented_size() {
    let values = pseudo_grad(1000, 1);
    let expect = [
        (Codec::Fp32, 4000),
        (Codec::Bf16, 2000),
        // 4 blocks: 3 full of 256 and one of 232, each with a 4-byte scale.
        (INT8, 16 + 1000),
        (INT4, 16 + 3 * 128 + 116),
    ];
    for (codec, body) in expect {
        let blob = encode(&values, &plain(codec)).unwrap();
        assert_eq!(blob.len(), BLOB_HEADER_LEN + body, "{codec}");
        assert_eq!(codec.body_len(1000), body, "{codec}");
    }
}

#[test]
fn encoded_bytes_are_pinned() {
    // Any change to rounding, packing or the header shows up here: peers on different releases
    // or CPUs must produce and read the same bytes.
    let values: Vec<f32> = (0..17).map(|i| (i as f32 - 8.0) * 0.25).collect();
    let int8 = encode(&values, &plain(Codec::Int8 { block_size: 16 })).unwrap();
    let int4 = encode(&values, &plain(Codec::Int4 { block_size: 16 })).unwrap();
    let bf16 = encode(&values[..4], &plain(Codec::Bf16)).unwrap();
    let header = |id: u8, count: u8, block: u8| {
        vec![
            b'F', b'G', b'Q', b'T', 1, 0, id, 0, count, 0, 0, 0, block, 0, 0, 0,
        ]
    };
    // Block 0: absmax 2.0 → scale 2/127; value k·0.25 → round(k·0.25·63.5) = round(15.875k).
    let mut expect8 = header(2, 17, 16);
    expect8.extend_from_slice(&(2.0f32 / 127.0).to_le_bytes());
    expect8.extend(
        [
            -127i8, -111, -95, -79, -64, -48, -32, -16, 0, 16, 32, 48, 64, 79, 95, 111,
        ]
        .map(|q| q as u8),
    );
    // Block 1 holds 2.0 alone: scale 2/127, code 127.
    expect8.extend_from_slice(&(2.0f32 / 127.0).to_le_bytes());
    expect8.push(127);
    assert_eq!(int8, expect8);
    // int4: scale 2/7, codes round(k·0.25·(1/scale)); 1/scale is 3.4999998 in f32, so ±3.5
    // rounds toward zero here (ties proper are in `block_codes_round_ties_to_even`).
    let mut expect4 = header(3, 17, 16);
    expect4.extend_from_slice(&(2.0f32 / 7.0).to_le_bytes());
    let codes: [i8; 16] = [-7, -6, -5, -4, -3, -3, -2, -1, 0, 1, 2, 3, 3, 4, 5, 6];
    expect4.extend(
        codes
            .chunks(2)
            .map(|p| (p[0] as u8 & 0x0F) | ((p[1] as u8) << 4)),
    );
    expect4.extend_from_slice(&(2.0f32 / 7.0).to_le_bytes());
    expect4.push(7);
    assert_eq!(int4, expect4);
    // -2.0, -1.75, -1.5, -1.25 are exact in bf16.
    let mut expect_bf16 = header(1, 4, 0);
    for bits in [0xC000u16, 0xBFE0, 0xBFC0, 0xBFA0] {
        expect_bf16.extend_from_slice(&bits.to_le_bytes());
    }
    assert_eq!(bf16, expect_bf16);
}

#[test]
fn block_codes_round_ties_to_even() {
    // absmax = qmax makes the scale exactly 1, so x.5 are true ties.
    let ties = [0.5f32, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5];
    for (codec, qmax) in [
        (Codec::Int8 { block_size: 16 }, 127.0),
        (Codec::Int4 { block_size: 16 }, 7.0),
    ] {
        let mut values = vec![qmax];
        values.extend(ties);
        let decoded = decode(&encode(&values, &plain(codec)).unwrap(), 8, &plain(codec)).unwrap();
        assert_eq!(
            decoded,
            [qmax, 0.0, 2.0, 2.0, -0.0, -2.0, -2.0, 4.0],
            "{codec}"
        );
    }
}

#[test]
fn bf16_rounds_to_nearest_even() {
    let cases = [
        // Exactly halfway, even neighbour below: stays.
        (0x3F80_8000u32, 0x3F80u16),
        // Exactly halfway, odd neighbour below: rounds up to even.
        (0x3F81_8000, 0x3F82),
        // Above halfway rounds up, below rounds down.
        (0x3F80_8001, 0x3F81),
        (0x3F80_7FFF, 0x3F80),
        // Carry into the exponent.
        (0x3FFF_FFFF, 0x4000),
    ];
    for (input, expected) in cases {
        let blob = encode(&[f32::from_bits(input)], &plain(Codec::Bf16)).unwrap();
        assert_eq!(
            u16::from_le_bytes([blob[16], blob[17]]),
            expected,
            "{input:#010x}"
        );
    }
}

#[test]
fn encode_and_decode_are_bit_exact_functions_of_their_input() {
    let values = pseudo_grad(10_000, 3);
    for compression in all_compressions() {
        let first = encode(&values, &compression).unwrap();
        let second = encode(&values.clone(), &compression).unwrap();
        assert_eq!(first, second, "{compression}");
        let a = decode(&first, values.len(), &compression).unwrap();
        let mut b = vec![f32::NAN; values.len()];
        decode_into(&second, &mut b, &compression).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a), bits(&b), "{compression}");
        // Adding to zeros gives the same bits as decoding.
        let mut acc = vec![0f32; values.len()];
        decode_add_into(&first, &mut acc, &compression).unwrap();
        assert_eq!(bits(&acc), bits(&a), "{compression}");
    }
}

#[test]
fn decode_add_accumulates_peers_in_place() {
    let peers: Vec<Vec<f32>> = (0..3).map(|seed| pseudo_grad(777, seed)).collect();
    let compression = zstd3(INT8);
    let mut acc = vec![0f32; 777];
    let mut expected = vec![0f32; 777];
    for peer in &peers {
        let blob = encode(peer, &compression).unwrap();
        decode_add_into(&blob, &mut acc, &compression).unwrap();
        for (e, d) in expected
            .iter_mut()
            .zip(decode(&blob, 777, &compression).unwrap())
        {
            *e += d;
        }
    }
    assert_eq!(acc, expected);
}

#[test]
fn non_finite_input_is_refused_with_its_index() {
    for compression in all_compressions() {
        for poison in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut values = pseudo_grad(600, 2);
            values[517] = poison;
            let err = encode(&values, &compression).unwrap_err();
            assert!(
                matches!(err, Error::NonFinite { index: 517, .. }),
                "{compression}: {err}"
            );
        }
    }
    let mut values = vec![0.5f32; 3000];
    values[2049] = f32::NAN;
    let err = check_finite(&values).unwrap_err();
    assert!(err.to_string().contains("index 2049"), "{err}");
    assert!(check_finite(&pseudo_grad(3000, 4)).is_ok());
}

#[test]
fn extreme_finite_values_never_decode_to_infinity() {
    let extremes = [
        f32::MAX,
        -f32::MAX,
        f32::MIN_POSITIVE,
        1e-45,
        0.0,
        -0.0,
        3.0e38,
        1e-40,
    ];
    for compression in all_compressions() {
        for &v in &extremes {
            let values = vec![v; 33];
            match encode(&values, &compression) {
                Ok(blob) => {
                    let decoded = decode(&blob, 33, &compression).unwrap();
                    assert!(
                        decoded.iter().all(|d| d.is_finite()),
                        "{compression}: {v} decoded to {decoded:?}"
                    );
                }
                // bf16 cannot hold f32::MAX; the block codecs shrink the scale by an ulp instead.
                Err(err) => assert!(
                    matches!(err, Error::OutOfRange { .. }) && compression.codec == Codec::Bf16,
                    "{compression}: {v}: {err}"
                ),
            }
        }
    }
}

#[test]
fn mismatched_blobs_are_refused_with_both_sides_named() {
    let values = pseudo_grad(300, 5);
    let blob = encode(&values, &plain(INT8)).unwrap();
    let err = decode(&blob, 300, &plain(INT4)).unwrap_err();
    assert!(matches!(err, Error::CodecMismatch { .. }), "{err}");
    assert!(err.to_string().contains("int4 (block 256)"), "{err}");
    let err = decode(&blob, 300, &plain(Codec::Int8 { block_size: 128 })).unwrap_err();
    assert!(err.to_string().contains("block size 256"), "{err}");
    assert!(matches!(
        decode(&blob, 300, &zstd3(INT8)),
        Err(Error::CodecMismatch { .. })
    ));
    let err = decode(&blob, 301, &plain(INT8)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ValueCountMismatch {
                expected: 301,
                found: 300
            }
        ),
        "{err}"
    );

    let mut bad_magic = blob.clone();
    bad_magic[0] = b'X';
    assert!(matches!(
        decode(&bad_magic, 300, &plain(INT8)),
        Err(Error::BadMagic {
            kind: "encoded tensor",
            ..
        })
    ));
    let mut newer = blob.clone();
    newer[4] = 2;
    assert!(matches!(
        decode(&newer, 300, &plain(INT8)),
        Err(Error::UnsupportedFormat { found: 2, .. })
    ));
    assert!(matches!(
        decode(&blob[..blob.len() - 1], 300, &plain(INT8)),
        Err(Error::LengthMismatch { .. })
    ));
    assert!(matches!(
        decode(&blob[..10], 300, &plain(INT8)),
        Err(Error::Truncated { .. })
    ));
    let mut longer = blob.clone();
    longer.push(0);
    assert!(matches!(
        decode(&longer, 300, &plain(INT8)),
        Err(Error::LengthMismatch { .. })
    ));
}

#[test]
fn corrupt_scale_or_code_is_refused_and_leaves_the_accumulator_alone() {
    let values = pseudo_grad(512, 6);
    let compression = plain(INT8);
    let blob = encode(&values, &compression).unwrap();
    let before = vec![1.0f32; 512];
    // The second block's scale (at 16 + 4 + 256) set to infinity, then to a negative value.
    for scale in [f32::INFINITY, -1.0, f32::MAX] {
        let mut bad = blob.clone();
        bad[276..280].copy_from_slice(&scale.to_le_bytes());
        let mut acc = before.clone();
        let err = decode_add_into(&bad, &mut acc, &compression).unwrap_err();
        assert!(matches!(err, Error::CorruptTensor { .. }), "{scale}: {err}");
        assert!(err.to_string().contains("block 1"), "{err}");
        assert_eq!(acc, before, "a refused blob must not touch the sum");
    }
    let mut bad = blob.clone();
    bad[300] = 0x80;
    assert!(matches!(
        decode(&bad, 512, &compression),
        Err(Error::CorruptTensor { .. })
    ));
}

#[test]
fn zstd_frame_that_inflates_past_the_body_is_cut_off() {
    let compression = zstd3(INT8);
    let mut blob = encode(&pseudo_grad(256, 8), &compression).unwrap();
    blob.truncate(BLOB_HEADER_LEN);
    // 1 MiB of zeros: a valid frame, far larger than the 260-byte body of 256 int8 values.
    blob.extend(zstd::bulk::compress(&vec![0u8; 1 << 20], 3).unwrap());
    let err = decode(&blob, 256, &compression).unwrap_err();
    assert!(
        matches!(err, Error::Zstd(_) | Error::DecompressedSize { .. }),
        "{err}"
    );
}

#[test]
fn block_size_and_zstd_level_are_validated() {
    for bad in [0, 8, 100, 255, 131_072] {
        let err = Compression::new(Codec::Int8 { block_size: bad }, None).unwrap_err();
        assert!(
            err.to_string().contains(&format!("block size {bad}")),
            "{err}"
        );
    }
    for good in [16, 256, 65_536] {
        assert!(Compression::new(Codec::Int4 { block_size: good }, None).is_ok());
    }
    let err = Compression::new(Codec::Fp32, Some(99)).unwrap_err();
    assert!(err.to_string().contains("zstd level 99"), "{err}");
    // encode validates too, so a hand-built Compression cannot slip through.
    let unchecked = Compression {
        codec: Codec::Int8 { block_size: 3 },
        zstd: None,
    };
    assert!(encode(&[1.0], &unchecked).is_err());
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Diloco {
    compression: Compression,
}

fn from_toml(text: &str) -> std::result::Result<Compression, String> {
    toml::from_str::<Diloco>(text)
        .map(|d| d.compression)
        .map_err(|e| e.to_string())
}

#[test]
fn config_names_codecs_in_toml() {
    assert_eq!(
        from_toml("compression = { codec = \"int8\", block_size = 128, zstd = 3 }").unwrap(),
        zstd3(Codec::Int8 { block_size: 128 })
    );
    assert_eq!(
        from_toml("[compression]\ncodec = \"int4\"").unwrap(),
        plain(INT4),
        "block size defaults to 256, no zstd key means no zstd"
    );
    assert_eq!(
        from_toml("compression = { codec = \"bf16\" }").unwrap(),
        plain(Codec::Bf16)
    );
    for (text, needle) in [
        (
            "compression = { codec = \"int8\", block_size = 100 }",
            "block size 100",
        ),
        (
            "compression = { codec = \"fp32\", block_size = 256 }",
            "has no blocks",
        ),
        ("compression = { codec = \"int3\" }", "int3"),
        (
            "compression = { codec = \"int8\", zstd = 40 }",
            "zstd level 40",
        ),
        ("compression = { codec = \"int8\", level = 3 }", "level"),
    ] {
        let err = from_toml(text).unwrap_err();
        assert!(err.contains(needle), "{text}: {err}");
    }
    // Serialising gives the same flat shape back.
    let text = toml::to_string(&zstd3(INT4)).unwrap();
    assert_eq!(toml::from_str::<Compression>(&text).unwrap(), zstd3(INT4));
    assert!(text.contains("codec = \"int4\""), "{text}");
}

#[test]
fn sync_codec_names_each_codec_with_its_block_size() {
    assert_eq!(plain(Codec::Fp32).sync_codec(), (SyncCodec::F32, false));
    assert_eq!(zstd3(Codec::Bf16).sync_codec(), (SyncCodec::Bf16, true));
    assert_eq!(
        plain(Codec::Int8 { block_size: 64 }).sync_codec(),
        (SyncCodec::Int8Blocks { block: 64 }, false)
    );
    assert_eq!(
        zstd3(INT4).sync_codec(),
        (SyncCodec::Int4Blocks { block: 256 }, true)
    );
}

/// Sums `rounds` outer gradients in which one value per block of 256 is large (1e-2, so the
/// int4 step is 1.4e-3) and the others carry a steady 3e-4 or -2e-4 plus a little noise: below
/// half a step, so plain rounding drops them every round. Returns the worst gap between what
/// was meant and what the receivers summed after `rounds / 10` and after `rounds` rounds, and
/// the largest quantisation step seen.
fn drift(feedback: bool, rounds: usize) -> (f64, f64, f64) {
    let len = 1024;
    let compression = plain(INT4);
    let steady: Vec<f32> = (0..len)
        .map(|i| match i % 256 {
            0 => 1e-2,
            i if i % 2 == 0 => 3e-4,
            _ => -2e-4,
        })
        .collect();
    let mut state = ErrorFeedback::new(compression, len).unwrap();
    let mut sent = vec![0f64; len];
    let mut received = vec![0f64; len];
    let mut early = 0.0;
    let mut max_step = 0f64;
    for round in 0..rounds {
        let noise = pseudo_grad(len, round as u64);
        let x: Vec<f32> = steady
            .iter()
            .zip(&noise)
            .map(|(s, n)| s + n * 1e-2)
            .collect();
        let blob = if feedback {
            state.compress(&x).unwrap()
        } else {
            encode(&x, &compression).unwrap()
        };
        let decoded = decode(&blob, len, &compression).unwrap();
        for i in 0..len {
            sent[i] += f64::from(x[i]);
            received[i] += f64::from(decoded[i]);
        }
        let absmax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        max_step = max_step.max(f64::from(absmax) / 7.0);
        if round + 1 == rounds / 10 {
            early = gap(&sent, &received);
        }
    }
    (early, gap(&sent, &received), max_step)
}

fn gap(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn error_feedback_keeps_the_running_sum_within_one_step() {
    let rounds = 500;
    let (early, late, step) = drift(true, rounds);
    println!(
        "with error feedback: gap {early:.2e} after 50 rounds, {late:.2e} after {rounds}; step {step:.2e}"
    );
    assert!(
        late <= step,
        "gap {late} exceeds one quantisation step {step}"
    );
    assert!(early <= step);
    let (early, late, step) = drift(false, rounds);
    println!(
        "without: gap {early:.2e} after 50 rounds, {late:.2e} after {rounds}; step {step:.2e}"
    );
    assert!(
        late > 20.0 * step,
        "without feedback the gap should grow past 20 steps: {late}"
    );
    assert!(
        late > 5.0 * early,
        "without feedback the gap should keep growing: {early} → {late}"
    );
}

#[test]
fn error_feedback_residual_is_what_the_receiver_missed() {
    let x = pseudo_grad(700, 9);
    for compression in all_compressions() {
        let mut state = ErrorFeedback::new(compression, 700).unwrap();
        let blob = state.compress(&x).unwrap();
        let decoded = decode(&blob, 700, &compression).unwrap();
        for i in 0..700 {
            assert_eq!(
                state.residual()[i],
                x[i] - decoded[i],
                "{compression} at {i}"
            );
        }
        if compression.codec.is_lossless() {
            assert!(state.residual().iter().all(|&e| e == 0.0));
        }
        // A refused input leaves the residual as it was.
        let before = state.residual().to_vec();
        let mut poisoned = x.clone();
        poisoned[3] = f32::NAN;
        assert!(state.compress(&poisoned).is_err());
        assert!(state.compress(&x[..10]).is_err());
        assert_eq!(state.residual(), &before[..]);
        state.reset();
        assert!(state.residual().iter().all(|&e| e == 0.0));
    }
}

/// Chunks of one buffer compressed with `compress_at` keep the same residuals as one
/// independent feedback state per chunk, round after round.
#[test]
fn error_feedback_by_chunk_matches_independent_states() {
    let compression = Compression::new(Codec::Int4 { block_size: 64 }, None).unwrap();
    let ranges = [0..300, 300..650, 650..700];
    let mut whole = ErrorFeedback::new(compression, 700).unwrap();
    let mut parts: Vec<ErrorFeedback> = ranges
        .iter()
        .map(|r| ErrorFeedback::new(compression, r.len()).unwrap())
        .collect();
    let mut a = vec![0xAB; 4096];
    for round in 0..5 {
        let x = pseudo_grad(700, 20 + round);
        for (range, part) in ranges.iter().zip(&mut parts) {
            // A reused buffer, as the all-reduce passes: its old bytes must not leak through.
            whole
                .compress_at(range.start, &x[range.clone()], &mut a)
                .unwrap();
            let b = part.compress(&x[range.clone()]).unwrap();
            assert_eq!(a, b, "round {round} range {range:?}");
            assert_eq!(&whole.residual()[range.clone()], part.residual());
        }
    }
    assert!(
        whole.compress_at(690, &[0.0; 20], &mut a).is_err(),
        "past the end"
    );
    assert!(
        whole.compress_at(usize::MAX, &[0.0; 2], &mut a).is_err(),
        "overflowing offset"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..2048),
        len in 0usize..1024,
        which in 0usize..12,
    ) {
        let compression = all_compressions()[which];
        if let Ok(values) = decode(&bytes, len, &compression) {
            prop_assert!(values.iter().all(|v| v.is_finite()));
        }
    }

    #[test]
    fn random_header_on_a_valid_body_never_panics(
        header in proptest::array::uniform16(any::<u8>()),
        which in 0usize..12,
    ) {
        // Real magic and version, so the fields behind them are what gets exercised.
        let compression = all_compressions()[which];
        let mut blob = encode(&pseudo_grad(300, 10), &compression).unwrap();
        blob[..BLOB_HEADER_LEN].copy_from_slice(&header);
        blob[..6].copy_from_slice(&[b'F', b'G', b'Q', b'T', 1, 0]);
        if let Ok(values) = decode(&blob, 300, &compression) {
            prop_assert!(values.iter().all(|v| v.is_finite()));
        }
    }

    #[test]
    fn mutated_blobs_decode_to_finite_values_or_an_error(
        seed in any::<u64>(),
        len in 1usize..700,
        flips in proptest::collection::vec((any::<usize>(), 1u8..=255), 1..4),
        which in 0usize..12,
    ) {
        let compression = all_compressions()[which];
        let mut blob = encode(&pseudo_grad(len, seed), &compression).unwrap();
        for (at, mask) in flips {
            let at = at % blob.len();
            blob[at] ^= mask;
        }
        let mut acc = vec![0.5f32; len];
        match decode_add_into(&blob, &mut acc, &compression) {
            Ok(()) => prop_assert!(acc.iter().all(|v| v.is_finite())),
            Err(_) => prop_assert!(acc.iter().all(|&v| v == 0.5)),
        }
    }

    #[test]
    fn any_finite_input_round_trips_within_bound(
        values in proptest::collection::vec(-1e30f32..1e30, 0..600),
        which in 0usize..12,
    ) {
        let compression = all_compressions()[which];
        let blob = encode(&values, &compression).unwrap();
        let decoded = decode(&blob, values.len(), &compression).unwrap();
        let block = block_len(compression.codec);
        for (i, (&v, &d)) in values.iter().zip(&decoded).enumerate() {
            let chunk = &values[i / block * block..((i / block + 1) * block).min(values.len())];
            prop_assert!((v - d).abs() <= max_error(compression.codec, chunk, v), "{} {} {}", i, v, d);
        }
    }
}

/// Best of a few runs, in MB/s of f32 data (4 bytes per value).
fn throughput(values: usize, mut f: impl FnMut()) -> f64 {
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let start = Instant::now();
        f();
        best = best.min(start.elapsed().as_secs_f64());
    }
    (values * 4) as f64 / best / 1e6
}

/// Prints bytes per value, relative L2 error and speeds on 1M pseudo_grad-like values, and
/// checks the sizes and errors against what each codec promises. Run the release build for
/// meaningful speeds: `cargo test --release -p forge-protocol quant -- --nocapture`.
#[test]
fn quant_report_on_a_pseudo_gradient() {
    let n = 1 << 20;
    let values = pseudo_grad(n, 42);
    println!(
        "\n{n} values, normal(0, 1e-3) with 1 in 10^4 scaled 10x; single thread, {} build",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    println!(
        "{:<26} {:>11} {:>11} {:>10} {:>10} {:>10}",
        "codec", "bytes/value", "rel. L2", "enc MB/s", "dec MB/s", "add MB/s"
    );
    let codecs = [Codec::Fp32, Codec::Bf16, INT8, INT4];
    for compression in codecs.iter().flat_map(|&c| [plain(c), zstd3(c)]) {
        let blob = encode(&values, &compression).unwrap();
        let decoded = decode(&blob, n, &compression).unwrap();
        let bytes_per_value = blob.len() as f64 / n as f64;
        let error = rel_l2(&values, &decoded);
        let enc = throughput(n, || {
            std::hint::black_box(encode(&values, &compression).unwrap());
        });
        let mut out = vec![0f32; n];
        let dec = throughput(n, || decode_into(&blob, &mut out, &compression).unwrap());
        let add = throughput(n, || {
            decode_add_into(&blob, &mut out, &compression).unwrap()
        });
        println!(
            "{:<26} {bytes_per_value:>11.4} {error:>11.2e} {enc:>10.0} {dec:>10.0} {add:>10.0}",
            compression.to_string()
        );
        let (max_bytes, max_error) = match compression.codec {
            Codec::Fp32 => (4.0, 0.0),
            Codec::Bf16 => (2.0, 3e-3),
            Codec::Int8 { .. } => (1.0 + 4.0 / 256.0, 1e-2),
            Codec::Int4 { .. } => (0.5 + 4.0 / 256.0, 0.15),
        };
        let max_bytes = max_bytes + (BLOB_HEADER_LEN as f64 / n as f64);
        // zstd may add a few bytes of framing on incompressible data.
        assert!(
            bytes_per_value <= max_bytes * 1.001,
            "{compression}: {bytes_per_value}"
        );
        assert!(
            error <= max_error,
            "{compression}: relative L2 error {error}"
        );
    }
}

/// `encode_into` a buffer that held a longer, different blob gives exactly `encode`'s bytes, for
/// every codec, with and without zstd.
#[test]
fn encode_into_a_used_buffer_matches_encode() {
    let x = pseudo_grad(700, 31);
    let mut blob = vec![0x5A; 10_000];
    for compression in all_compressions() {
        encode_into(&x, &compression, &mut blob).unwrap();
        assert_eq!(blob, encode(&x, &compression).unwrap(), "{compression:?}");
        assert!(encode_into(&[f32::NAN], &compression, &mut blob).is_err());
    }
}
