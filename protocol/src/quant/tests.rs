//! Tests of the codecs, their blob format, error feedback, and a printed size/error/speed table.

use std::time::Instant;

use proptest::prelude::*;

use super::*;
use crate::rng::SplitMix64;

const INT8: Codec = Codec::Int8 { block_size: 256 };
const INT4: Codec = Codec::Int4 { block_size: 256 };
const TOPK: Codec = Codec::TopK {
    block_size: 4096,
    k: 64,
    bits: 2,
};

fn plain(codec: Codec) -> Compression {
    Compression::new(codec, None).unwrap()
}

fn zstd3(codec: Codec) -> Compression {
    Compression::new(codec, Some(3)).unwrap()
}

/// Every codec, block sizes at both ends of the range, with and without zstd; topk also keeping
/// every value of a block and with 4 bits.
fn all_compressions() -> Vec<Compression> {
    let codecs = [
        Codec::Fp32,
        Codec::Bf16,
        Codec::Int8 { block_size: 16 },
        INT8,
        Codec::Int4 { block_size: 16 },
        INT4,
        Codec::TopK {
            block_size: 64,
            k: 5,
            bits: 2,
        },
        Codec::TopK {
            block_size: 64,
            k: 64,
            bits: 4,
        },
        Codec::TopK {
            block_size: 128,
            k: 9,
            bits: 4,
        },
        TOPK,
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
/// block codecs, half a bf16 ulp, nothing for fp32. topk may also drop `v` when it is not above
/// the block's k-th largest magnitude.
fn max_error(codec: Codec, block: &[f32], v: f32) -> f32 {
    let absmax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
    match codec {
        Codec::Fp32 => 0.0,
        Codec::Bf16 => v.abs() * 2f32.powi(-8),
        Codec::Int8 { .. } => absmax / 127.0 * 0.5001,
        Codec::Int4 { .. } => absmax / 7.0 * 0.5001,
        Codec::TopK { k, bits, .. } => {
            let mut magnitudes: Vec<f32> = block.iter().map(|x| x.abs()).collect();
            let kept = (k as usize).min(block.len());
            let (_, &mut kth, _) =
                magnitudes.select_nth_unstable_by(kept - 1, |a, b| b.total_cmp(a));
            // Levels 2·absmax/qmax apart.
            let half_spacing = absmax / ((1 << bits) - 1) as f32 * 1.0001;
            if v.abs() <= kth {
                half_spacing.max(v.abs())
            } else {
                half_spacing
            }
        }
    }
}

fn block_len(codec: Codec) -> usize {
    match codec {
        Codec::Fp32 | Codec::Bf16 => 1,
        Codec::Int8 { block_size }
        | Codec::Int4 { block_size }
        | Codec::TopK { block_size, .. } => block_size as usize,
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
fn config_names_topk_with_density_and_bits() {
    let topk = |block_size, k, bits| Codec::TopK {
        block_size,
        k,
        bits,
    };
    assert_eq!(
        from_toml("compression = { codec = \"topk\", block_size = 4096, density = 0.015625, bits = 2, zstd = 3 }")
            .unwrap(),
        zstd3(TOPK)
    );
    for (text, codec) in [
        ("{ codec = \"topk\" }", TOPK),
        ("{ codec = \"topk\", bits = 4 }", topk(4096, 64, 4)),
        // k = ceil(4096 · 0.01) = 41, at least 1, at most the block.
        ("{ codec = \"topk\", density = 0.01 }", topk(4096, 41, 2)),
        ("{ codec = \"topk\", density = 1e-9 }", topk(4096, 1, 2)),
        (
            "{ codec = \"topk\", block_size = 64, density = 1.0 }",
            topk(64, 64, 2),
        ),
        (
            "{ codec = \"topk\", block_size = 65536 }",
            topk(65_536, 1024, 2),
        ),
    ] {
        assert_eq!(
            from_toml(&format!("compression = {text}")).unwrap(),
            plain(codec),
            "{text}"
        );
    }
    for (text, needle) in [
        (
            "{ codec = \"topk\", density = 0.0 }",
            "density = 0 of topk is not in (0, 1]",
        ),
        ("{ codec = \"topk\", density = 1.5 }", "density = 1.5"),
        ("{ codec = \"topk\", density = nan }", "density = NaN"),
        ("{ codec = \"topk\", bits = 3 }", "bits must be 2 or 4"),
        (
            "{ codec = \"topk\", block_size = 32 }",
            "block size 32 of topk",
        ),
        (
            "{ codec = \"topk\", block_size = 1000 }",
            "block size 1000 of topk",
        ),
        (
            "{ codec = \"int8\", density = 0.1 }",
            "density = 0.1 is set but codec int8 keeps every value; remove density or use codec = \"topk\"",
        ),
        (
            "{ codec = \"fp32\", bits = 2 }",
            "bits = 2 is set but codec fp32 has a fixed width; remove bits or use codec = \"topk\"",
        ),
        ("{ codec = \"topk\", k = 64 }", "unknown field `k`"),
    ] {
        let err = from_toml(&format!("compression = {text}")).unwrap_err();
        assert!(err.contains(needle), "{text}: {err}");
    }
    // Serialising gives a density that gives back the same k, even one no round number names.
    for codec in [TOPK, topk(4096, 41, 4), topk(64, 1, 2)] {
        let text = toml::to_string(&zstd3(codec)).unwrap();
        assert!(text.contains("codec = \"topk\""), "{text}");
        assert_eq!(
            toml::from_str::<Compression>(&text).unwrap(),
            zstd3(codec),
            "{text}"
        );
    }
    assert_eq!(TOPK.name(), "topk");
    assert_eq!(TOPK.to_string(), "topk (block 4096, k 64, 2-bit)");
    assert!(!TOPK.is_lossless());
    // A hand-built codec is validated too.
    for bad in [topk(4096, 0, 2), topk(64, 65, 2), topk(4096, 64, 8)] {
        assert!(Compression::new(bad, None).is_err(), "{bad}");
    }
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
    assert_eq!(
        zstd3(TOPK).sync_codec(),
        (
            SyncCodec::TopK {
                block: 4096,
                k: 64,
                bits: 2
            },
            true
        )
    );
}

/// A topk block as the tests read and write it, bit by bit, apart from the kernels.
#[derive(Clone)]
struct TopKBlock {
    scale: f32,
    indices: Vec<u32>,
    codes: Vec<u32>,
}

fn pack(values: &[u32], width: usize) -> Vec<u8> {
    let mut out = vec![0u8; (values.len() * width).div_ceil(8)];
    for (i, &v) in values.iter().enumerate() {
        for b in 0..width {
            let bit = i * width + b;
            out[bit / 8] |= ((v >> b & 1) as u8) << (bit % 8);
        }
    }
    out
}

fn unpack(bytes: &[u8], width: usize, count: usize) -> Vec<u32> {
    (0..count)
        .map(|i| {
            (0..width).fold(0, |v, b| {
                let bit = i * width + b;
                v | u32::from(bytes[bit / 8] >> (bit % 8) & 1) << b
            })
        })
        .collect()
}

/// Splits the body of an uncompressed topk blob of `len` values into its blocks.
fn topk_blocks(blob: &[u8], codec: Codec, len: usize) -> Vec<TopKBlock> {
    let Codec::TopK {
        block_size,
        k,
        bits,
    } = codec
    else {
        panic!("{codec} is not topk");
    };
    let width = block_size.trailing_zeros() as usize;
    let mut rest = &blob[BLOB_HEADER_LEN..];
    let mut blocks = Vec::new();
    for start in (0..len).step_by(block_size as usize) {
        let kept = (k as usize).min(len - start).min(block_size as usize);
        let index_bytes = (kept * width).div_ceil(8);
        let code_bytes = (kept * bits as usize).div_ceil(8);
        let scale = f32::from_le_bytes(rest[..4].try_into().unwrap());
        blocks.push(TopKBlock {
            scale,
            indices: unpack(&rest[4..], width, kept),
            codes: unpack(&rest[4 + index_bytes..], bits.into(), kept),
        });
        rest = &rest[4 + index_bytes + code_bytes..];
    }
    assert!(rest.is_empty(), "{} bytes after the last block", rest.len());
    blocks
}

/// The blob holding `blocks` under the header of `blob`.
fn topk_blob(blob: &[u8], codec: Codec, blocks: &[TopKBlock]) -> Vec<u8> {
    let Codec::TopK {
        block_size, bits, ..
    } = codec
    else {
        panic!("{codec} is not topk");
    };
    let mut out = blob[..BLOB_HEADER_LEN].to_vec();
    for block in blocks {
        out.extend_from_slice(&block.scale.to_le_bytes());
        out.extend(pack(&block.indices, block_size.trailing_zeros() as usize));
        out.extend(pack(&block.codes, bits.into()));
    }
    out
}

/// The indices of the `k` largest `|x|` of `block`, ties to the lower index, ascending.
fn top_k(block: &[f32], k: usize) -> Vec<u32> {
    let mut order: Vec<usize> = (0..block.len()).collect();
    order.sort_by(|&a, &b| block[b].abs().total_cmp(&block[a].abs()).then(a.cmp(&b)));
    let mut kept: Vec<u32> = order[..k.min(block.len())]
        .iter()
        .map(|&i| i as u32)
        .collect();
    kept.sort_unstable();
    kept
}

#[test]
fn topk_keeps_exactly_the_k_largest_of_each_block_with_their_signs() {
    let codecs = [
        TOPK,
        Codec::TopK {
            block_size: 4096,
            k: 64,
            bits: 4,
        },
        Codec::TopK {
            block_size: 64,
            k: 5,
            bits: 4,
        },
    ];
    // 10,000 ends in a block of 1808 values, 4116 in one of 20: fewer than k, so all kept.
    for len in [10_000, 4116] {
        let values = pseudo_grad(len, 11);
        for codec in codecs {
            let Codec::TopK {
                block_size,
                k,
                bits,
            } = codec
            else {
                unreachable!()
            };
            let blob = encode(&values, &plain(codec)).unwrap();
            let decoded = decode(&blob, len, &plain(codec)).unwrap();
            let qmax = ((1 << bits) - 1) as f32;
            let chunks = values.chunks(block_size as usize);
            for (b, ((vals, outs), block)) in chunks
                .zip(decoded.chunks(block_size as usize))
                .zip(topk_blocks(&blob, codec, len))
                .enumerate()
            {
                let kept = top_k(vals, k as usize);
                assert_eq!(block.indices, kept, "{codec}, {len} values, block {b}");
                let absmax = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert_eq!(block.scale, absmax);
                let step = absmax / qmax;
                for (i, (&v, &d)) in vals.iter().zip(outs).enumerate() {
                    if kept.contains(&(i as u32)) {
                        // The nearest of the odd levels, with v's sign.
                        let level = d.abs() / step;
                        assert!(
                            (level.round() - level).abs() < 1e-3
                                && level.round() as u32 % 2 == 1
                                && level.round() <= qmax,
                            "{codec}: {v} decoded as {d}, {level} steps"
                        );
                        assert_eq!(d.is_sign_negative(), v.is_sign_negative());
                        assert!((d - v).abs() <= step * 1.0001, "{codec}: {v} → {d}");
                    } else {
                        assert_eq!(d.to_bits(), 0, "{codec}: dropped value {i} of block {b}");
                    }
                }
            }
        }
    }
}

#[test]
fn topk_ties_go_to_the_lower_index() {
    let codec = Codec::TopK {
        block_size: 64,
        k: 4,
        bits: 2,
    };
    // Block 0: two values of magnitude 1, then 62 tied at 0.25 of both signs. Block 1: 64 values
    // tied at 0.5. Block 2: zeros of both signs.
    let mut values: Vec<f32> = (0..64)
        .map(|i| if i % 2 == 0 { 0.25 } else { -0.25 })
        .collect();
    values[40] = -1.0;
    values[20] = 1.0;
    values.extend((0..64).map(|i| if i % 3 == 0 { -0.5 } else { 0.5 }));
    values.extend((0..64).map(|i| if i % 2 == 0 { -0.0 } else { 0.0 }));
    let blob = encode(&values, &plain(codec)).unwrap();
    let indices: Vec<Vec<u32>> = topk_blocks(&blob, codec, values.len())
        .into_iter()
        .map(|block| block.indices)
        .collect();
    assert_eq!(
        indices,
        [vec![0, 1, 20, 40], vec![0, 1, 2, 3], vec![0, 1, 2, 3]]
    );
    let decoded = decode(&blob, values.len(), &plain(codec)).unwrap();
    // Block 0's scale is 1: 0.25 goes to the level 1/3, 1 to 3/3.
    assert_eq!(decoded[..2], [1.0 / 3.0, -1.0 / 3.0]);
    assert_eq!((decoded[20], decoded[40]), (1.0, -1.0));
    assert_eq!(decoded[64..68], [-0.5, 0.5, 0.5, -0.5]);
    assert!(decoded[128..].iter().all(|&d| d == 0.0));
}

#[test]
fn topk_encoded_bytes_are_pinned() {
    // Block 0 keeps -3 (index 5), 1 (9) and 2.5 (40) of 64; block 1 keeps three of its six
    // values, four of which tie at 0.5.
    let mut values = vec![0f32; 70];
    (values[5], values[9], values[40], values[41]) = (-3.0, 1.0, 2.5, 0.2);
    values[64..].copy_from_slice(&[0.5, -0.5, 0.25, 0.0, -0.5, 0.5]);
    let header = |field: [u8; 4]| {
        let mut header = vec![b'F', b'G', b'Q', b'T', 1, 0, 4, 0, 70, 0, 0, 0];
        header.extend(field);
        header
    };
    // 2 bits: field 6 | 3 << 5 | 2 << 22. Indices 5, 9, 40 and 0, 1, 4 at 6 bits each; codes
    // (sign << 1 | j) for |v| / (scale / 3) nearest to 2j + 1: -3 → 0b11, 1 → 0b00,
    // 2.5 → 0b01; 0.5 → 0b01, -0.5 → 0b11.
    let mut expect2 = header([0x66, 0x00, 0x80, 0x00]);
    expect2.extend(3.0f32.to_le_bytes());
    expect2.extend([0x45, 0x82, 0x02, 0x13]);
    expect2.extend(0.5f32.to_le_bytes());
    expect2.extend([0x40, 0x40, 0x00, 0x3D]);
    let two = Codec::TopK {
        block_size: 64,
        k: 3,
        bits: 2,
    };
    assert_eq!(encode(&values, &plain(two)).unwrap(), expect2);
    // 4 bits: field 6 | 3 << 5 | 4 << 22; codes (sign << 3 | j) against scale / 15:
    // -3 → 0xF, 1 → 0x2, 2.5 → 0x6; 0.5 → 0x7, -0.5 → 0xF.
    let mut expect4 = header([0x66, 0x00, 0x00, 0x01]);
    expect4.extend(3.0f32.to_le_bytes());
    expect4.extend([0x45, 0x82, 0x02, 0x2F, 0x06]);
    expect4.extend(0.5f32.to_le_bytes());
    expect4.extend([0x40, 0x40, 0x00, 0xF7, 0x0F]);
    let four = Codec::TopK {
        block_size: 64,
        k: 3,
        bits: 4,
    };
    assert_eq!(encode(&values, &plain(four)).unwrap(), expect4);
}

#[test]
fn topk_size_follows_the_length_and_is_under_one_percent_of_fp32() {
    let small = Codec::TopK {
        block_size: 64,
        k: 5,
        bits: 4,
    };
    // TOPK: 116 bytes a block keeping 64 (4 + 64·12/8 + 64·2/8); a block of 20 keeps all 20 in
    // 4 + 30 + 5. small: 4 + ceil(5·6/8) + ceil(5·4/8) = 11 per block.
    for (codec, len, body) in [
        (TOPK, 1, 4 + 2 + 1),
        (TOPK, 20, 39),
        (TOPK, 4096, 116),
        (TOPK, 4116, 116 + 39),
        (TOPK, 10_000, 3 * 116),
        (small, 64, 11),
        (small, 100, 22),
        (small, 3, 4 + 3 + 2),
    ] {
        assert_eq!(codec.body_len(len), body, "{codec}, {len} values");
        let blob = encode(&pseudo_grad(len, 12), &plain(codec)).unwrap();
        assert_eq!(blob.len(), BLOB_HEADER_LEN + body, "{codec}, {len} values");
    }
    let n = 1 << 20;
    let values = pseudo_grad(n, 13);
    for compression in [plain(TOPK), zstd3(TOPK)] {
        let ratio = encode(&values, &compression).unwrap().len() as f64 / (4 * n) as f64;
        println!("{compression}: {:.4}% of fp32", ratio * 100.0);
        assert!(ratio < 0.01, "{compression}: {ratio}");
    }
}

#[test]
fn corrupt_topk_blobs_are_refused_and_leave_the_accumulator_alone() {
    let codec = Codec::TopK {
        block_size: 64,
        k: 3,
        bits: 2,
    };
    let compression = plain(codec);
    // Blocks of 64 and 36 values; each keeps 3 indices in 18 bits and 3 codes in 6, so both
    // have padding.
    let values = pseudo_grad(100, 14);
    let blob = encode(&values, &compression).unwrap();
    let blocks = topk_blocks(&blob, codec, 100);
    assert_eq!(
        topk_blob(&blob, codec, &blocks),
        blob,
        "the tests pack as the codec does"
    );
    let with = |edit: &dyn Fn(&mut TopKBlock)| {
        let mut blocks = blocks.clone();
        edit(&mut blocks[1]);
        topk_blob(&blob, codec, &blocks)
    };
    let with_bit = |at: usize, mask: u8| {
        let mut bad = blob.clone();
        bad[at] |= mask;
        bad
    };
    // Block 1 starts at 16 + 8: scale, 3 index bytes, 1 code byte.
    let mut cases = vec![
        (
            with(&|b| b.indices = vec![2, 2, 30]),
            "index 2 after index 2",
        ),
        (
            with(&|b| b.indices = vec![2, 30, 7]),
            "index 7 after index 30",
        ),
        (
            with(&|b| b.indices = vec![2, 7, 40]),
            "index 40, past its 36 values",
        ),
        (with_bit(24 + 6, 0x40), "non-zero padding"),
        (with_bit(24 + 7, 0x80), "non-zero padding"),
        (blob[..blob.len() - 1].to_vec(), "payload bytes"),
    ];
    for scale in [-1.0, -0.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        cases.push((with(&|b| b.scale = scale), "scale"));
    }
    let before = vec![1.0f32; 100];
    for (bad, needle) in cases {
        let mut acc = before.clone();
        let err = decode_add_into(&bad, &mut acc, &compression).unwrap_err();
        assert!(err.to_string().contains(needle), "{needle}: {err}");
        assert_eq!(acc, before, "a refused blob must not touch the sum: {err}");
        assert!(decode(&bad, 100, &compression).is_err(), "{needle}");
    }
    // Another k, bits or block size in the header, or expected by the receiver.
    for other in [
        Codec::TopK {
            block_size: 64,
            k: 4,
            bits: 2,
        },
        Codec::TopK {
            block_size: 64,
            k: 3,
            bits: 4,
        },
        Codec::TopK {
            block_size: 128,
            k: 3,
            bits: 2,
        },
    ] {
        let err = decode(&blob, 100, &plain(other)).unwrap_err();
        assert!(matches!(err, Error::CodecMismatch { .. }), "{err}");
        let found = |codec: Codec| {
            let Codec::TopK {
                block_size,
                k,
                bits,
            } = codec
            else {
                unreachable!()
            };
            format!("uses topk (codec id 4), block {block_size}, k {k}, {bits}-bit")
        };
        assert!(err.to_string().contains(&other.to_string()), "{err}");
        assert!(err.to_string().contains(&found(codec)), "{err}");
        // The same body under the other codec's header.
        let mut relabelled = encode(&values, &plain(other)).unwrap();
        relabelled.truncate(BLOB_HEADER_LEN);
        relabelled.extend_from_slice(&blob[BLOB_HEADER_LEN..]);
        let mut acc = before.clone();
        let err = decode_add_into(&relabelled, &mut acc, &compression).unwrap_err();
        assert!(err.to_string().contains(&found(other)), "{err}");
        assert_eq!(acc, before);
    }
}

/// The relative gap between the sums of what `rounds` rounds of `x` meant and what topk sent,
/// with or without error feedback; also the residual's norm and the largest norm one round
/// sent, both relative to `|x|`.
fn topk_drift(x: &[f32], feedback: bool, rounds: usize) -> (f64, f64, f64) {
    fn norm(v: impl IntoIterator<Item = f64>) -> f64 {
        v.into_iter().map(|a| a * a).sum::<f64>().sqrt()
    }
    let x_norm = norm(x.iter().map(|&v| f64::from(v)));
    let compression = plain(TOPK);
    let mut state = ErrorFeedback::new(compression, x.len()).unwrap();
    let mut gap = vec![0f64; x.len()];
    let mut max_sent = 0f64;
    for _ in 0..rounds {
        let blob = if feedback {
            state.compress(x).unwrap()
        } else {
            encode(x, &compression).unwrap()
        };
        let decoded = decode(&blob, x.len(), &compression).unwrap();
        for ((g, &v), &d) in gap.iter_mut().zip(x).zip(&decoded) {
            *g += f64::from(v) - f64::from(d);
        }
        max_sent = max_sent.max(norm(decoded.iter().map(|&d| f64::from(d))) / x_norm);
    }
    let residual = norm(state.residual().iter().map(|&e| f64::from(e))) / x_norm;
    let relative_gap = norm(gap) / (rounds as f64 * x_norm);
    (relative_gap, residual, max_sent)
}

/// The same vector sent round after round through topk (64 of 4096 at 2 bits): with error
/// feedback every value is sent once its residual is among the largest of its block, so the
/// residual stays bounded while the sums grow and their relative gap shrinks; without it the
/// same 64 values a block are sent every round and the rest never.
#[test]
fn error_feedback_with_topk_tracks_the_running_sum() {
    let x = pseudo_grad(4 * 4096, 15);
    let (gap_100, residual_100, _) = topk_drift(&x, true, 100);
    let (gap_200, residual_200, max_sent) = topk_drift(&x, true, 200);
    let (gap_without, _, _) = topk_drift(&x, false, 200);
    println!(
        "topk with error feedback: sums {gap_100:.3} apart after 100 rounds, {gap_200:.3} after \
         200; residual {residual_100:.1}x then {residual_200:.1}x |x|; one round sends up to \
         {max_sent:.1}x |x|. Without: {gap_without:.3} apart after 200 rounds"
    );
    assert!(gap_200 < 0.15, "{gap_200}");
    assert!(gap_200 < 0.6 * gap_100, "{gap_100} → {gap_200}");
    assert!(
        residual_200 < 1.2 * residual_100,
        "{residual_100} → {residual_200}"
    );
    assert!(gap_without > 0.8, "{gap_without}");
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
        compression in proptest::sample::select(all_compressions()),
    ) {
        if let Ok(values) = decode(&bytes, len, &compression) {
            prop_assert!(values.iter().all(|v| v.is_finite()));
        }
    }

    #[test]
    fn random_header_on_a_valid_body_never_panics(
        header in proptest::array::uniform16(any::<u8>()),
        compression in proptest::sample::select(all_compressions()),
    ) {
        // Real magic and version, so the fields behind them are what gets exercised.
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
        compression in proptest::sample::select(all_compressions()),
    ) {
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
        compression in proptest::sample::select(all_compressions()),
    ) {
        let blob = encode(&values, &compression).unwrap();
        let decoded = decode(&blob, values.len(), &compression).unwrap();
        let block = block_len(compression.codec);
        for (i, (&v, &d)) in values.iter().zip(&decoded).enumerate() {
            let chunk = &values[i / block * block..((i / block + 1) * block).min(values.len())];
            prop_assert!((v - d).abs() <= max_error(compression.codec, chunk, v), "{} {} {}", i, v, d);
        }
    }

    /// Values from a handful of magnitudes, so most of a block ties.
    #[test]
    fn topk_keeps_the_k_largest_of_any_input(
        values in proptest::collection::vec((-3i8..=3).prop_map(|q| f32::from(q) * 0.5), 1..400),
        block_size in proptest::sample::select(vec![64u32, 128]),
        k in 1u32..=128,
        bits in proptest::sample::select(vec![2u8, 4]),
    ) {
        let codec = Codec::TopK { block_size, k: k.min(block_size), bits };
        let blob = encode(&values, &plain(codec)).unwrap();
        let blocks = topk_blocks(&blob, codec, values.len());
        for (block, vals) in blocks.iter().zip(values.chunks(block_size as usize)) {
            prop_assert_eq!(&block.indices, &top_k(vals, k.min(block_size) as usize));
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
        "{:<40} {:>11} {:>11} {:>10} {:>10} {:>10}",
        "codec", "bytes/value", "rel. L2", "enc MB/s", "dec MB/s", "add MB/s"
    );
    let codecs = [
        Codec::Fp32,
        Codec::Bf16,
        INT8,
        INT4,
        TOPK,
        Codec::TopK {
            block_size: 4096,
            k: 64,
            bits: 4,
        },
    ];
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
            "{:<40} {bytes_per_value:>11.4} {error:>11.2e} {enc:>10.0} {dec:>10.0} {add:>10.0}",
            compression.to_string()
        );
        let (max_bytes, max_error) = match compression.codec {
            Codec::Fp32 => (4.0, 0.0),
            Codec::Bf16 => (2.0, 3e-3),
            Codec::Int8 { .. } => (1.0 + 4.0 / 256.0, 1e-2),
            Codec::Int4 { .. } => (0.5 + 4.0 / 256.0, 0.15),
            // The kept 1/64 of a normal distribution hold about 12% of its energy; error
            // feedback sends the rest in later rounds.
            Codec::TopK { .. } => (compression.codec.body_len(n) as f64 / n as f64, 0.96),
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
